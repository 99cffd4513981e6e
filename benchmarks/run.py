"""Benchmark model variants on real data: DSC/NSD per case and modality, CPU latency, FLOPs, params, memory.

    python -m benchmarks.run [--data DIR] [--models litemedsam,cp_tinyvit,LABEL=PATH | all] [--out DIR] [--all]
                             [--case-times | --clicks N [--no-zoom]] [--latency-budget SECONDS | --no-latency]

By default it compares the fair baselines (LiteMedSAM in PyTorch and on OpenVINO FP32 and INT8) and the zoo's main
models (zoo/index.json entries marked default_benchmark); `--models all` takes every zoo variant this CPU can run.

Writes OUT/cases.csv (case, modality, model, dsc, nsd, seconds), OUT/leaderboard.csv (one row per variant) and
plots (OUT/radar.png, OUT/latency_vs_dsc.png, and OUT/confusion_<model>.png for models with a modality head, whose
accuracy over the cases is the leaderboard's head_accuracy). Each variant runs in its own process, through the same
inference path as zoo.predict, so its peak memory is its own and a crash does not stop the others. Without --all a
fixed, seeded sample of --cases-per-modality cases per modality is taken (every modality, 2D images and 3D volumes;
a volume is drawn from the quarter of its modality's volumes with the fewest slices to segment).

Timing (benchmarks.latency): each variant's first call on the fresh model (first_call_2d_ms: what one zoo.segment
of an image pays after load_s), then its latencies at steady state on fixed inputs (a 256² image with one box; a
24×256×256 volume with a box over 12 slices), so a latency does not depend on how many cases ran before it.
speedup_vs_litemedsam and speedup_vs_litemedsam_openvino compare with the baselines timed in the same run.

Image embeddings are kept in --cache-dir (float32, keyed by the encoder's weights and the image), so variants that
share an encoder, and later runs, embed each image once; scores are the same as without the cache. The cache is
kept to --cache-max-gb by deleting the encoders used least recently (zoo.runtime.embedding_cache). With
--case-times there is no cache: each case is timed whole, from reading its npz to its written segs (the challenge's
efficiency measure), with the median and maximum per model and modality, and the slowest case, in OUT/case_times.csv.

--clicks N runs the interactive protocol on every case (benchmarks.clicks: the box, then N simulated clicks per
object), with the click columns in cases.csv and the leaderboard, and the curves in OUT/clicks.csv and clicks.png;
--no-zoom decodes every click on the whole image (no zoom crop for small objects, no focus crop for sparse ones: a
click costs the decoder alone).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import clicks as interactive
from benchmarks.evaluate import summarize
from benchmarks.latency import BUDGET_S, first_call_ms, measure_latency
from zoo.cli import RUNS_DIR, positive_int, run_cli
from zoo.data.io import (
    DATA_ENV,
    CaseError,
    WriteError,
    data_split,
    load_case,
    npz_inputs,
    read_csv,
    refuse_overwriting_inputs,
    save_npz_atomic,
    write_csv_atomic,
)
from zoo.data.scoring import case_scores
from zoo.modalities import MODALITIES, head_accuracy, modality_confusion, modality_from_name, modality_id
from zoo.predict import ModalityChoice, segment_case
from zoo.runtime.cpu import cpu_flags, cpu_model
from zoo.runtime.embedding_cache import CACHE_MAX_GB, ENCODER_CACHE_DIR, CachedEncoder

REFERENCE_PARAMS_M = 10.99  # the class-prompt TinyViT paper's model
CASE_FIELDS = ["case", "modality", "model", "dsc", "nsd", "seconds"]
LEADERBOARD_FIELDS = (
    ["model", "backend", "precision", "params_M", "params_vs_reference", "encoder_GFLOPs", "decoder_GFLOPs_per_box",
     "file_MB", "latency_2d_ms", "encoder_ms", "decoder_ms_per_box", "latency_3d_s", "peak_RSS_MB", "cases",
     "head_accuracy"]
    + [f"{metric}_{m}" for m in MODALITIES for metric in ("dsc", "nsd")]
    + ["dsc_mean_modalities", "nsd_mean_modalities", "dsc_mean_cases", "nsd_mean_cases"]
    + ["parent", "dsc_vs_parent", "nsd_vs_parent", "encoder_speedup_vs_parent"]
    # Appended, so that earlier leaderboards still merge (their rows leave these empty): which precision is fast
    # depends on the CPU's instruction set (zoo.runtime.cpu).
    + ["cpu", "cpu_flags"]
    # Steady-state timing (benchmarks.latency), the first call and load, speed-ups against the fair baselines timed in
    # the same run, and whole-case wall times (--case-times).
    + ["warmup_runs", "latency_stable", "first_call_2d_ms", "load_s", "speedup_vs_litemedsam",
       "speedup_vs_litemedsam_openvino", "wall_case_median_s", "wall_case_max_s", "slowest_case"]
)
CASE_TIME_FIELDS = ["model", "modality", "cases", "median_s", "max_s", "slowest_case"]


def default_data_dir() -> Path:
    """The val split (zoo.data.io.data_split); CaseError saying how to name data when there is none."""
    val = data_split("val")
    if val.is_dir():
        return val
    raise CaseError(val, f"no data to benchmark here: pass --data DIR (challenge npz files with imgs, boxes, gts and, "
                         f"for 3D, spacing), or set {DATA_ENV} to a folder with a val/ split")


def slices_to_segment(path: Path) -> int:
    """How many slices a 3D case's boxes span (what segmenting it costs); 0 for a 2D case."""
    if not path.name.startswith("3D"):
        return 0
    with np.load(path) as arrays:
        boxes = np.asarray(arrays["boxes"]).reshape(-1, 6)
    return int((boxes[:, 5] - boxes[:, 2] + 1).sum())


def sample_candidates(group: list[Path]) -> list[Path]:
    """A modality's cases a sample draws from: its 2D images, and the quarter (at least one) of its 3D volumes with
    the fewest slices to segment. An unreadable volume ranks last: when drawn, the run reports it."""
    images = [p for p in group if not p.name.startswith("3D")]
    volumes = [p for p in group if p.name.startswith("3D")]

    def cost(path: Path) -> float:
        try:
            return slices_to_segment(path)
        except (OSError, ValueError, KeyError, IndexError):
            return float("inf")

    volumes = sorted(volumes, key=lambda p: (cost(p), p.name))[: max(1, len(volumes) // 4)] if volumes else []
    return images + volumes


def select_cases(data_dir: Path, per_modality: int | None, seed: int = 0, small_volumes: bool = True) -> list[Path]:
    """Every npz in data_dir (per_modality None), or a seeded sample of per_modality files per modality, drawn
    from each modality's sample_candidates (small_volumes) or from all its files (the sample before volumes were
    chosen by size: benchmarks/compression's runs)."""
    files, _ = npz_inputs(data_dir)
    if per_modality is None:
        return files
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[modality_from_name(path.name) or "unknown"].append(path)
    rng = random.Random(seed)
    chosen = []
    for name in sorted(groups):
        candidates = sample_candidates(groups[name]) if small_volumes else groups[name]
        chosen += rng.sample(candidates, min(per_modality, len(candidates)))
    return sorted(chosen)


def split_label(entry: str) -> tuple[str, str]:
    """A --models entry 'LABEL=MODEL' -> (LABEL, MODEL): the board names MODEL (a zoo name or path) LABEL; any other
    entry is named by variant_label."""
    label, equals, model = entry.partition("=")
    return (label.strip(), model.strip()) if equals and label.strip() else (variant_label(entry), entry)


def variant_label(name: str) -> str:
    """A zoo name as it is; a checkpoint path by its file stem; a replaced parent's @<sha8> (model_parent) kept."""
    name, at, version = name.partition("@")
    path = Path(name)
    if path.name == "manifest.json":
        label = path.parent.name
    else:
        label = path.stem if path.suffix in (".pt", ".pth") else path.name
    return label + at + version


def benchmark_variant(entry: str, files: list[Path], threads: int, latency_budget: float | None,
                      segs_dir: Path | None, cache_dir: Path | None, labels: dict[str, str] | None = None,
                      case_times: bool = False, clicks: int = 0, zoom: bool = True,
                      cache_max_gb: float = CACHE_MAX_GB) -> dict:
    """Runs in a child process: the first call on the fresh model, every case through zoo's inference path, then
    steady-state latency, FLOPs and size.

    With a cache_dir, image embeddings are looked up there first (float32, keyed by the encoder's weights), so
    variants sharing an encoder embed each image once; latency is always measured on the model itself. With
    case_times, no cache: each case is timed whole, from reading its npz to its written segs (the challenge's
    efficiency measure), into segs_dir or a temporary folder. With `clicks` (not with case_times), each case runs
    the interactive protocol (benchmarks.clicks): its box step is the box-only result, its seconds the box step's."""
    from zoo.index import load, model_bytes, model_parent
    from zoo.models.flops import model_size

    label, name = split_label(entry)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = load(name)
    load_s = time.perf_counter() - started
    first_call = first_call_ms(model) if latency_budget is not None else ""
    scored = CachedEncoder(model, cache_dir, cache_max_gb) if cache_dir is not None and not case_times else model
    modalities = ModalityChoice(scored)
    cases, errors = [], []
    confusion = modality_confusion()
    with tempfile.TemporaryDirectory(prefix=".cp-tinyvit-segs-") as scratch:
        written = segs_dir if segs_dir is not None else Path(scratch)
        for path in tqdm(files, desc=label, unit="case", leave=False):
            start = time.perf_counter()
            protocol = None
            try:
                case = load_case(path)
                if case.gts is None:
                    raise CaseError(path, "no 'gts' to score against")
                if clicks:
                    protocol = interactive.run_protocol(scored, case, modalities, clicks, zoom=zoom)
                    segs, head_modality = protocol["steps"][-1], protocol["head_modality"]
                else:
                    result = segment_case(scored, case, modalities)
                    segs, head_modality = result.segs, result.head_modality
                if case_times or segs_dir is not None:
                    # with clicks, as the challenge's script saves them: the last step's and every step's
                    save_npz_atomic(written / path.name, segs=segs,
                                    **({"all_segs": np.stack(protocol["steps"])} if protocol else {}))
            except WriteError as err:  # named; the case is still scored
                errors.append(str(err))
            except CaseError as err:
                errors.append(str(err))
                continue
            seconds = protocol["seconds"] if protocol else time.perf_counter() - start
            if head_modality is not None and case.modality is not None:
                confusion[modality_id(case.modality), modality_id(head_modality)] += 1
            row = {"case": path.name, "modality": case.modality or "unknown", "model": label, "seconds": seconds}
            if protocol:
                cases.append(interactive.step_scores({**row, "click_seconds": protocol["click_seconds"],
                                                      "crop_embeddings": protocol["crop_embeddings"]},
                                                     protocol["dsc"], protocol["nsd"], clicks))
            else:
                dsc, nsd = case_scores(case.gts, segs, case.spacing.tolist())
                cases.append({**row, "dsc": dsc, "nsd": nsd})
    if latency_budget is not None:
        latency = measure_latency(model, budget_s=latency_budget)
    else:
        latency = dict.fromkeys(LATENCY_FIELDS, "")
    walls = [c["seconds"] for c in cases] if case_times else []
    slowest = max(cases, key=lambda c: c["seconds"]) if walls else None
    size = model_size(model)
    row = {
        "model": label, "backend": model.backend, "precision": model.precision, "params_M": size["params"] / 1e6,
        "encoder_GFLOPs": size["encoder_flops"] / 1e9, "decoder_GFLOPs_per_box": size["decoder_flops_per_box"] / 1e9,
        "file_MB": model_bytes(name) / 1e6,
        **latency, "first_call_2d_ms": first_call, "load_s": load_s,
        "wall_case_median_s": float(np.median(walls)) if walls else "", "wall_case_max_s": max(walls) if walls else "",
        "slowest_case": slowest["case"] if slowest else "",
        # This child's peak; ru_maxrss also covers the parent's RSS when it spawned the child, which is much smaller.
        "peak_RSS_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "head_accuracy": head_accuracy(confusion) if confusion.sum() else "",
        # a parent benchmarked in the same run under a label of its own is named by it
        "parent": (labels or {}).get(model_parent(name) or "", variant_label(model_parent(name) or "")),
        "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()),
    }
    if clicks and cases:
        row.update(interactive.leaderboard_columns(cases, clicks, zoom))
        row["click_ms"] = interactive.click_latency(model, budget_s=latency_budget) if latency_budget is not None else ""
    return {"cases": cases, "row": row, "errors": errors, "confusion": confusion if confusion.sum() else None}


LATENCY_FIELDS = ("latency_2d_ms", "encoder_ms", "decoder_ms_per_box", "latency_3d_s", "warmup_runs", "latency_stable")
# The fair baselines: LiteMedSAM as published (PyTorch) and as the challenge's leaders deployed it (OpenVINO FP32).
BASELINES = {"speedup_vs_litemedsam": "litemedsam", "speedup_vs_litemedsam_openvino": "litemedsam_openvino"}


def leaderboard_row(result: dict) -> dict:
    row = dict(result["row"])
    row["params_vs_reference"] = row["params_M"] / REFERENCE_PARAMS_M
    row["cases"] = len(result["cases"])
    summary = {s["group"]: s for s in summarize(result["cases"])}
    for m in MODALITIES:
        row[f"dsc_{m}"] = summary[m]["dsc"] if m in summary else ""
        row[f"nsd_{m}"] = summary[m]["nsd"] if m in summary else ""
    for key, group in (("mean_modalities", "mean over modalities"), ("mean_cases", "mean over cases")):
        row[f"dsc_{key}"] = summary[group]["dsc"] if group in summary else ""
        row[f"nsd_{key}"] = summary[group]["nsd"] if group in summary else ""
    return row


def compare_with_parents(rows: list[dict], timed_together: set[str]) -> None:
    """Each variant's change against its parent (the model it was exported, quantized or pruned from) where the
    parent is on the same leaderboard: mean DSC/NSD over modalities, and encoder speed-up when both were timed in
    this run (timings of different runs do not compare)."""
    by_name = {r["model"]: r for r in rows}
    for row in rows:
        parent = by_name.get(row.get("parent"))
        if parent is None or parent is row:
            continue
        for metric in ("dsc", "nsd"):
            if row[f"{metric}_mean_modalities"] != "" and parent[f"{metric}_mean_modalities"] != "":
                row[f"{metric}_vs_parent"] = row[f"{metric}_mean_modalities"] - parent[f"{metric}_mean_modalities"]
        if {row["model"], parent["model"]} <= timed_together and row["encoder_ms"] != "" and parent["encoder_ms"] != "":
            row["encoder_speedup_vs_parent"] = parent["encoder_ms"] / row["encoder_ms"]
        elif {row["model"], parent["model"]} & timed_together:
            row["encoder_speedup_vs_parent"] = ""  # one of them was re-timed: an earlier ratio no longer holds


def compare_with_baselines(rows: list[dict], timed_together: set[str]) -> None:
    """speedup_vs_<baseline>: the baseline's 2D latency over the variant's, for variants timed in this run beside it
    (a ratio of timings from different runs would mix machines and loads)."""
    by_name = {r["model"]: r for r in rows}
    for column, baseline_name in BASELINES.items():
        baseline = by_name.get(baseline_name)
        for row in rows:
            if row["model"] not in timed_together:
                continue
            timed = baseline is not None and baseline_name in timed_together
            ok = timed and row["latency_2d_ms"] not in ("", 0) and baseline["latency_2d_ms"] != ""
            row[column] = baseline["latency_2d_ms"] / row["latency_2d_ms"] if ok else ""


def case_time_rows(cases: list[dict]) -> list[dict]:
    """Whole-case wall times per model and modality: how many cases, median, maximum and the slowest case."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in cases:
        groups[(case["model"], case["modality"])].append(case)
    rows = []
    for (model, modality), group in sorted(groups.items()):
        slowest = max(group, key=lambda c: c["seconds"])
        rows.append({"model": model, "modality": modality, "cases": len(group),
                     "median_s": float(np.median([c["seconds"] for c in group])), "max_s": slowest["seconds"],
                     "slowest_case": slowest["case"]})
    return rows


def _fmt(row: dict) -> dict:
    return {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}


def _number(text: str):
    """A leaderboard cell read back: an int stays an int ("147", not "147.0000" once merged), a float a float."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def merge_previous(out: Path, cases: list[dict], rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """This run's cases and rows added to OUT's earlier leaderboard, replacing the rows and cases of models
    benchmarked again (check_mergeable has made sure, before the run, that the earlier cases are this run's)."""
    if not (out / "leaderboard.csv").exists():
        return cases, rows
    old_rows = [{k: _number(v) for k, v in r.items()} for r in read_csv(out / "leaderboard.csv")]
    this_run = {r["model"] for r in rows}
    kept = [c for c in read_csv(out / "cases.csv") if c["model"] not in this_run]
    return kept + [_fmt(c) for c in cases], [r for r in old_rows if r["model"] not in this_run] + rows


def check_mergeable(out: Path, files: list[Path]) -> None:
    """Before any work: --merge needs OUT's earlier cases to be among this run's (rows of other case sets do not
    compare)."""
    if not (out / "cases.csv").exists():
        return
    earlier = {c["case"] for c in read_csv(out / "cases.csv")}
    if not earlier <= {f.name for f in files}:
        raise ValueError(f"--merge: {out / 'cases.csv'} was scored on other cases than this run's; "
                         "benchmark into another --out or with the same --data and --all / --cases-per-modality")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="directory of challenge npz files with gts (default: $MEDSEG_DATA/val, else ../shared/data/medseg-real/val)")
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo names or checkpoint paths (LABEL=PATH names a row), or 'all' (every "
                             "zoo variant); default: "
                             "LiteMedSAM and the zoo's main models (index entries marked default_benchmark)")
    parser.add_argument("--out", type=Path, default=RUNS_DIR / "benchmark", help="output directory (default runs/benchmark)")
    parser.add_argument("--cases-per-modality", type=int, default=1, help="seeded sample size per modality")
    parser.add_argument("--all", action="store_true", help="every case instead of a sample, latencies over 5 runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volumes", choices=("small", "any"), default="small",
                        help="draw a sample's 3D volumes from those with the fewest slices to segment, or from all")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads for every variant")
    parser.add_argument("--latency-budget", type=float, default=BUDGET_S, metavar="SECONDS",
                        help="time each latency part may take to reach steady state (benchmarks.latency's rule)")
    parser.add_argument("--case-times", action="store_true",
                        help="time every case whole, from reading its npz to its written segs, without the embedding "
                             "cache (the challenge's efficiency measure; OUT/case_times.csv)")
    parser.add_argument("--save-segs", type=Path, default=None, metavar="DIR",
                        help="also write each variant's segs npz files to DIR/<model>/")
    parser.add_argument("--cache-dir", type=Path, default=ENCODER_CACHE_DIR,
                        help="where image embeddings are kept for variants that share an encoder")
    parser.add_argument("--cache-max-gb", type=float, default=CACHE_MAX_GB,
                        help="keep the embedding cache at most this big: the encoders used least recently are deleted "
                             "(default: $CP_TINYVIT_CACHE_MAX_GB or %(default)g)")
    parser.add_argument("--no-embedding-cache", action="store_true", help="embed every image anew for every variant")
    parser.add_argument("--no-latency", action="store_true", help="scores only: leave the latency columns empty")
    parser.add_argument("--clicks", type=int, default=0, metavar="N",
                        help="run the interactive protocol (benchmarks.clicks): the box, then N simulated clicks per "
                             "object (the CVPR 2025 challenge: 5), scored after each step, with DSC_AUC / NSD_AUC")
    parser.add_argument("--no-zoom", action="store_true",
                        help="with --clicks: decode every click on the whole image's embedding alone (no zoom crop "
                             "for small objects, no focus crop for sparse ones: zoo.interactive)")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's models to OUT's leaderboard (same cases), replacing their earlier rows")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.latency_budget <= 0:
        parser.error("--latency-budget must be positive")
    if args.clicks < 0:
        parser.error("--clicks must be 0 or more")
    if args.cache_max_gb <= 0:
        parser.error("--cache-max-gb must be positive (--no-embedding-cache keeps no cache)")
    if args.clicks and args.case_times:
        parser.error("--clicks and --case-times time different things (a click step, a whole case): run them apart")
    if args.no_zoom and not args.clicks:
        parser.error("--no-zoom is about clicks: give --clicks N")
    return args


def latency_budget(args: argparse.Namespace) -> float | None:
    """Each latency part's time budget to reach steady state; None with --no-latency."""
    return None if args.no_latency else args.latency_budget


def benchmark_models(models: list[str], files: list[Path], args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Each variant benchmarked in its own child process; (their results, the names of variants that failed)."""
    results, failed = [], []
    context = multiprocessing.get_context("spawn")
    cache_dir = None if args.no_embedding_cache else args.cache_dir
    labels = {model: label for label, model in map(split_label, models)}
    for name in tqdm(models, desc="models", unit="model"):
        segs_dir = args.save_segs / split_label(name)[0] if args.save_segs else None
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(benchmark_variant, name, files, args.threads, latency_budget(args), segs_dir,
                                     cache_dir, labels, args.case_times, args.clicks, not args.no_zoom,
                                     args.cache_max_gb).result()
        except Exception as err:  # a broken variant is reported; the others still run
            failed.append(name)
            tqdm.write(f"error: variant {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            tqdm.write("".join(traceback.format_exception(err)[-3:]), file=sys.stderr)
            continue
        for message in result["errors"]:
            tqdm.write(f"error: {message}", file=sys.stderr)
        results.append(result)
    return results, failed


def write_outputs(out: Path, results: list[dict], merge: bool, threads: int, skipped: list[str],
                  case_times: bool = False) -> list[dict]:
    """OUT/cases.csv, OUT/leaderboard.csv (this run's rows, with --merge added to OUT's earlier ones) and the
    plots; returns this run's leaderboard rows. An output that cannot be written is named and added to `skipped`;
    the others are still written."""
    # Imported here: each variant's child process imports this module, and matplotlib is only needed here.
    from benchmarks.plots import confusion_plot, latency_plot, radar_plot

    cases = [c for r in results for c in r["cases"]]
    rows = [leaderboard_row(r) for r in results]
    all_cases, all_rows = merge_previous(out, cases, rows) if merge else ([_fmt(c) for c in cases], rows)
    timed = {r["model"] for r in rows if r["latency_2d_ms"] != ""}
    compare_with_parents(all_rows, timed)
    compare_with_baselines(all_rows, timed)
    clicks = interactive.clicks_of([c for c in all_cases if c.get("dsc_1", "") != ""])  # the click columns, if any
    case_fields = CASE_FIELDS + (interactive.case_fields(clicks) if clicks else [])
    board_fields = LEADERBOARD_FIELDS + (interactive.leaderboard_fields() if clicks else [])
    writes = [(write_csv_atomic, out / "cases.csv", [_fmt(c) for c in all_cases], case_fields),
              (write_csv_atomic, out / "leaderboard.csv", [_fmt(r) for r in all_rows], board_fields),
              (interactive.write_click_outputs, out, all_cases, all_rows),
              (radar_plot, all_rows, out / "radar.png"),
              (latency_plot, all_rows, out / "latency_vs_dsc.png", threads)]
    if case_times:  # this run's whole-case wall times, per model and modality
        writes.append((write_csv_atomic, out / "case_times.csv", [_fmt(r) for r in case_time_rows(cases)], CASE_TIME_FIELDS))
    for result, row in zip(results, rows):
        if result["confusion"] is not None:
            writes.append((confusion_plot, result["confusion"], out / f"confusion_{row['model']}.png",
                           f"{row['model']}: modality head on {int(result['confusion'].sum())} cases, "
                           f"accuracy {row['head_accuracy']:.3f}"))
    for write, *write_args in writes:
        try:
            write(*write_args)
        except WriteError as err:  # named; the other outputs are still written
            tqdm.write(f"error: {err}", file=sys.stderr)
            skipped.append(str(err.path))
    return rows


def summary_table(rows: list[dict]) -> str:
    """This run's variants, one line each: mean DSC / NSD over modalities, latencies, encoder FLOPs ('-' for what
    a variant without scored cases lacks)."""
    name_width = max([28] + [len(str(row["model"])) for row in rows])
    columns = [("model", "model", f"<{name_width}"), ("DSC", "dsc_mean_modalities", ">6.4f"), ("NSD", "nsd_mean_modalities", ">6.4f"),
               ("2D ms", "latency_2d_ms", ">7.0f"), ("3D s", "latency_3d_s", ">6.1f"),
               ("enc GFLOPs", "encoder_GFLOPs", ">10.1f"), ("cases", "cases", ">5")]
    width = {title: spec.lstrip("<>").split(".")[0].rstrip("f") for title, _, spec in columns}
    lines = [" ".join(f"{title:{spec[0]}{width[title]}}" for title, _, spec in columns)]
    for row in rows:
        lines.append(" ".join(f"{row[key]:{spec}}" if row[key] != "" else f"{'-':{spec[0]}{width[title]}}"
                              for title, key, spec in columns))
    return "\n".join(lines)


def chosen_models(models: str | None) -> list[str]:
    """--models: names / paths as given; 'all' every zoo variant; none the zoo's default benchmark set
    (zoo.index.default_benchmark_names). Of 'all' and the default set, variants this CPU cannot run (bf16 without
    BF16) are left out, each named; a variant asked for by name is tried."""
    from zoo.index import default_benchmark_names, not_on_this_cpu, zoo_names

    if models and models != "all":
        return [m.strip() for m in models.split(",") if m.strip()]
    chosen = []
    for name in zoo_names() if models == "all" else default_benchmark_names():
        reason = not_on_this_cpu(name)
        if reason:
            print(f"not benchmarked: {name}: {reason}")
        else:
            chosen.append(name)
    return chosen


def run(args: argparse.Namespace) -> list[dict]:
    data_dir = args.data or default_data_dir()
    if not data_dir.is_dir():
        raise CaseError(data_dir, "not a directory")
    models = chosen_models(args.models)
    files = select_cases(data_dir, None if args.all else args.cases_per_modality, args.seed, args.volumes == "small")
    outputs = [(args.out, "--out")] + [(args.save_segs / split_label(m)[0], "--save-segs") for m in models if args.save_segs]
    paths = [Path(split_label(m)[1]) for m in models]
    for output, option in outputs:
        refuse_overwriting_inputs(output, [data_dir, *files, *(p for p in paths if p.exists())], option)
    if args.merge:
        check_mergeable(args.out, files)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = "every case" if args.all else f"a seeded sample of {args.cases_per_modality} per modality"
    print(f"benchmarking {', '.join(models)} on {len(files)} cases ({kind}) of {data_dir} with {args.threads} threads")
    results, failed = benchmark_models(models, files, args)
    args.skipped += failed + [message for r in results for message in r["errors"]]
    rows = write_outputs(args.out, results, args.merge, args.threads, args.skipped, args.case_times) if results else []
    if rows:
        print(summary_table(rows) + "\n(DSC / NSD: means over modalities; 2D ms: a 256² image with one box; "
              "3D s: a 24-slice volume with a box over 12)")
        if args.clicks:
            print(interactive.summary(rows, args.clicks))
        print(f"leaderboard: {args.out / 'leaderboard.csv'} (per case: {args.out / 'cases.csv'})")
        plots = ["radar.png", "latency_vs_dsc.png"] + [f"confusion_{r['model']}.png" for r in rows if r["head_accuracy"] != ""]
        plots += ["clicks.png"] if args.clicks else []
        print(f"plots: {', '.join(str(args.out / name) for name in plots)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
