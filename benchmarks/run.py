"""Benchmark model variants on real data: DSC/NSD per case and modality, CPU latency, FLOPs, params, memory.

    python -m benchmarks.run [--data DIR] [--models litemedsam,cp_tinyvit,PATH | all] [--out DIR] [--all]

By default it compares LiteMedSAM and the zoo's main models (zoo/index.json entries marked default_benchmark);
`--models all` takes every zoo variant this CPU can run.

Writes OUT/cases.csv (case, modality, model, dsc, nsd, seconds), OUT/leaderboard.csv (one row per variant) and
plots (OUT/radar.png, OUT/latency_vs_dsc.png, and OUT/confusion_<model>.png for models with a modality head, whose
accuracy over the cases is the leaderboard's head_accuracy). Each variant runs in its own process, through the same inference
path as zoo.predict, so its peak memory is its own and a crash does not stop the others. Without --all a fixed,
seeded sample of --cases-per-modality cases per modality is taken (every modality, 2D images and 3D volumes; a
volume is drawn from the quarter of its modality's volumes with the fewest slices to segment, which keeps the
default run to minutes), and latencies are medians of 3 timed runs instead of 5.

Image embeddings are kept in --cache-dir (float32, keyed by the encoder's weights and the image), so variants that
share an encoder, and later runs, embed each image once; scores are the same as without the cache. The per-case
`seconds` then exclude the cached encoder runs: the leaderboard's latencies come from benchmarks.latency, which
times the model itself on fixed inputs (a 256² image with one box; a 24×256×256 volume with a box over 12 slices).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import sys
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
from benchmarks.latency import measure_latency
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
from zoo.runtime.embedding_cache import ENCODER_CACHE_DIR, CachedEncoder

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
)


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


def benchmark_variant(entry: str, files: list[Path], threads: int, timing: dict, segs_dir: Path | None,
                      cache_dir: Path | None, labels: dict[str, str] | None = None, clicks: int = 0) -> dict:
    """Runs in a child process: every case through zoo's inference path, then latency, FLOPs and size.

    With a cache_dir, image embeddings are looked up there first (float32, keyed by the encoder's weights), so
    variants sharing an encoder embed each image once; latency is always measured on the model itself. With
    `clicks`, each case runs the interactive protocol (benchmarks.clicks): its box step is the box-only result."""
    from zoo.index import load, model_bytes, model_parent
    from zoo.models.flops import model_size

    label, name = split_label(entry)
    torch.set_num_threads(threads)
    model = load(name)
    scored = CachedEncoder(model, cache_dir) if cache_dir is not None else model
    modalities = ModalityChoice(scored)
    cases, errors = [], []
    confusion = modality_confusion()
    for path in tqdm(files, desc=f"{name}", unit="case", leave=False):
        try:
            case = load_case(path)
            if case.gts is None:
                raise CaseError(path, "no 'gts' to score against")
            start = time.perf_counter()
            if clicks:
                protocol = interactive.run_protocol(scored, case, modalities, clicks)
                result, seconds = protocol["steps"][-1], protocol["seconds"]
                head_modality = protocol["head_modality"]
            else:
                result = segment_case(scored, case, modalities)
                seconds = time.perf_counter() - start
                head_modality = result.head_modality
                result = result.segs
        except CaseError as err:
            errors.append(str(err))
            continue
        if segs_dir is not None:
            try:  # with clicks, as the challenge's script saves them: the last step's and every step's
                save_npz_atomic(segs_dir / path.name, segs=result,
                                **({"all_segs": np.stack(protocol["steps"])} if clicks else {}))
            except WriteError as err:  # named; the case is still scored
                errors.append(str(err))
        if head_modality is not None and case.modality is not None:
            confusion[modality_id(case.modality), modality_id(head_modality)] += 1
        row = {"case": path.name, "modality": case.modality or "unknown", "model": label, "seconds": seconds}
        if clicks:
            cases.append(interactive.step_scores({**row, "click_seconds": protocol["click_seconds"]}, protocol["dsc"],
                                                 protocol["nsd"], clicks))
        else:
            dsc, nsd = case_scores(case.gts, result, case.spacing.tolist())
            cases.append({**row, "dsc": dsc, "nsd": nsd})
    latency = measure_latency(model, **timing) if timing else dict.fromkeys(LATENCY_FIELDS, "")
    size = model_size(model)
    row = {
        "model": label, "backend": model.backend, "precision": model.precision, "params_M": size["params"] / 1e6,
        "encoder_GFLOPs": size["encoder_flops"] / 1e9, "decoder_GFLOPs_per_box": size["decoder_flops_per_box"] / 1e9,
        "file_MB": model_bytes(name) / 1e6,
        **latency,
        # This child's peak; ru_maxrss also covers the parent's RSS when it spawned the child, which is much smaller.
        "peak_RSS_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "head_accuracy": head_accuracy(confusion) if confusion.sum() else "",
        # a parent benchmarked in the same run under a label of its own is named by it
        "parent": (labels or {}).get(model_parent(name) or "", variant_label(model_parent(name) or "")),
        "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()),
    }
    if clicks and cases:
        row.update(interactive.leaderboard_columns(cases, clicks))
        row["click_ms"] = interactive.click_latency(model, **timing) if timing else ""
    return {"cases": cases, "row": row, "errors": errors, "confusion": confusion if confusion.sum() else None}


LATENCY_FIELDS = ("latency_2d_ms", "encoder_ms", "decoder_ms_per_box", "latency_3d_s")


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


def _fmt(row: dict) -> dict:
    return {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
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
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per latency measurement (median; default 3, with --all 5)")
    parser.add_argument("--save-segs", type=Path, default=None, metavar="DIR",
                        help="also write each variant's segs npz files to DIR/<model>/")
    parser.add_argument("--cache-dir", type=Path, default=ENCODER_CACHE_DIR,
                        help="where image embeddings are kept for variants that share an encoder")
    parser.add_argument("--no-embedding-cache", action="store_true", help="embed every image anew for every variant")
    parser.add_argument("--no-latency", action="store_true", help="scores only: leave the latency columns empty")
    parser.add_argument("--clicks", type=int, default=0, metavar="N",
                        help="run the interactive protocol (benchmarks.clicks): the box, then N simulated clicks per "
                             "object (the CVPR 2025 challenge: 5), scored after each step, with DSC_AUC / NSD_AUC")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's models to OUT's leaderboard (same cases), replacing their earlier rows")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.clicks < 0:
        parser.error("--clicks must be 0 or more")
    return args


def latency_timing(args: argparse.Namespace) -> dict | None:
    """measure_latency's repeats and warm-up runs: the full run's 5 and 2; a sample's 3 and 1, as its latencies
    only have to place the variants (the shipped leaderboard's come from --all); None with --no-latency."""
    if args.no_latency:
        return None
    full = {"repeats": 5, "warmup": 2} if args.all else {"repeats": 3, "warmup": 1}
    return {**full, "repeats": args.repeats or full["repeats"]}


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
                result = pool.submit(benchmark_variant, name, files, args.threads, latency_timing(args), segs_dir,
                                     cache_dir, labels, args.clicks).result()
        except Exception as err:  # a broken variant is reported; the others still run
            failed.append(name)
            tqdm.write(f"error: variant {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            tqdm.write("".join(traceback.format_exception(err)[-3:]), file=sys.stderr)
            continue
        for message in result["errors"]:
            tqdm.write(f"error: {message}", file=sys.stderr)
        results.append(result)
    return results, failed


def write_outputs(out: Path, results: list[dict], merge: bool, threads: int, skipped: list[str]) -> list[dict]:
    """OUT/cases.csv, OUT/leaderboard.csv (this run's rows, with --merge added to OUT's earlier ones) and the
    plots; returns this run's leaderboard rows. An output that cannot be written is named and added to `skipped`;
    the others are still written."""
    # Imported here: each variant's child process imports this module, and matplotlib is only needed here.
    from benchmarks.plots import confusion_plot, latency_plot, radar_plot

    cases = [c for r in results for c in r["cases"]]
    rows = [leaderboard_row(r) for r in results]
    all_cases, all_rows = merge_previous(out, cases, rows) if merge else ([_fmt(c) for c in cases], rows)
    compare_with_parents(all_rows, {r["model"] for r in rows})
    clicks = interactive.clicks_of([c for c in all_cases if c.get("dsc_1", "") != ""])  # the click columns, if any
    case_fields = CASE_FIELDS + (interactive.case_fields(clicks) if clicks else [])
    board_fields = LEADERBOARD_FIELDS + (interactive.leaderboard_fields() if clicks else [])
    writes = [(write_csv_atomic, out / "cases.csv", [_fmt(c) for c in all_cases], case_fields),
              (write_csv_atomic, out / "leaderboard.csv", [_fmt(r) for r in all_rows], board_fields),
              (interactive.write_click_outputs, out, all_cases, all_rows),
              (radar_plot, all_rows, out / "radar.png"),
              (latency_plot, all_rows, out / "latency_vs_dsc.png", threads)]
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
    rows = write_outputs(args.out, results, args.merge, args.threads, args.skipped) if results else []
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
