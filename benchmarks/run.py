"""Benchmark model variants on real data: DSC/NSD per case and modality, CPU latency, FLOPs, params, memory.

    python -m benchmarks.run [--data DIR] [--models litemedsam,cp_tinyvit,PATH] [--out DIR] [--all]

Writes OUT/cases.csv (case, modality, model, dsc, nsd, seconds), OUT/leaderboard.csv (one row per variant) and
plots (OUT/radar.png, OUT/latency_vs_dsc.png, and OUT/confusion_<model>.png for models with a modality head, whose
accuracy over the cases is the leaderboard's head_accuracy). Each variant runs in its own process, through the same inference
path as zoo.predict, so its peak memory is its own and a crash does not stop the others. Without --all a fixed,
seeded sample of --cases-per-modality cases per modality is taken.

Image embeddings are kept in --cache-dir (float32, keyed by the encoder's weights and the image), so variants that
share an encoder, and later runs, embed each image once; scores are the same as without the cache. The per-case
`seconds` then exclude the cached encoder runs: the leaderboard's latencies come from benchmarks.latency, which
times the model itself on fixed inputs (a 256² image with one box; a 24×256×256 volume with a box over 12 slices).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
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

from benchmarks.evaluate import summarize
from benchmarks.latency import measure_latency
from benchmarks.metrics import case_scores
from benchmarks.plots import confusion_plot, latency_plot, radar_plot
from zoo.cpu import cpu_flags, cpu_model
from zoo.embedding_cache import ENCODER_CACHE_DIR, CachedEncoder
from zoo.io import SHARED_DATA, CaseError, load_case, save_npz_atomic, write_csv_atomic
from zoo.modalities import MODALITIES, modality_from_name, modality_id
from zoo.predict import ModalityChoice, segment_case

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SHARED_DATA / "val"
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
    # depends on the CPU's instruction set (zoo.cpu).
    + ["cpu", "cpu_flags"]
)


def default_data_dir() -> Path:
    if os.environ.get("MEDSEG_DATA"):
        return Path(os.environ["MEDSEG_DATA"])
    if DEFAULT_DATA.is_dir():
        return DEFAULT_DATA
    raise SystemExit(
        "error: no data to benchmark: pass --data DIR or set MEDSEG_DATA to a directory of challenge npz files "
        "(2DBox_<Modality>_*.npz / 3DBox_<Modality>_*.npz with imgs, boxes, gts and, for 3D, spacing); "
        f"the default {DEFAULT_DATA} does not exist"
    )


def select_cases(data_dir: Path, per_modality: int | None, seed: int = 0) -> list[Path]:
    """Every npz in data_dir (per_modality None), or a seeded sample of per_modality files per modality."""
    files = sorted(p for p in data_dir.iterdir() if p.suffix == ".npz")
    if not files:
        raise SystemExit(f"error: {data_dir}: no .npz files to benchmark")
    if per_modality is None:
        return files
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[modality_from_name(path.name) or "unknown"].append(path)
    rng = random.Random(seed)
    chosen = [p for name in sorted(groups) for p in rng.sample(groups[name], min(per_modality, len(groups[name])))]
    return sorted(chosen)


def variant_label(name: str) -> str:
    """A zoo name as it is; a checkpoint path by its file stem; a replaced parent's @<sha8> (model_parent) kept."""
    name, at, version = name.partition("@")
    path = Path(name)
    if path.name == "manifest.json":
        label = path.parent.name
    else:
        label = path.stem if path.suffix in (".pt", ".pth") else path.name
    return label + at + version


def benchmark_variant(name: str, files: list[Path], threads: int, repeats: int, segs_dir: Path | None,
                      cache_dir: Path | None) -> dict:
    """Runs in a child process: every case through zoo's inference path, then latency, FLOPs and size.

    With a cache_dir, image embeddings are looked up there first (float32, keyed by the encoder's weights), so
    variants sharing an encoder embed each image once; latency is always measured on the model itself."""
    from zoo.flops import model_size
    from zoo.index import load, model_bytes, model_parent

    torch.set_num_threads(threads)
    model = load(name)
    scored = CachedEncoder(model, cache_dir) if cache_dir is not None else model
    modalities = ModalityChoice(scored)
    label = variant_label(name)
    cases, errors = [], []
    confusion = np.zeros((len(MODALITIES), len(MODALITIES)), dtype=np.int64)
    for path in tqdm(files, desc=f"{name}", unit="case", leave=False):
        try:
            case = load_case(path)
            if case.gts is None:
                raise CaseError(path, "no 'gts' to score against")
            start = time.perf_counter()
            result = segment_case(scored, case, modalities)
            seconds = time.perf_counter() - start
        except CaseError as err:
            errors.append(str(err))
            continue
        if segs_dir is not None:
            save_npz_atomic(segs_dir / path.name, segs=result.segs)
        dsc, nsd = case_scores(case.gts, result.segs, case.spacing.tolist())
        if result.head_modality is not None and case.modality is not None:
            confusion[modality_id(case.modality), modality_id(result.head_modality)] += 1
        cases.append({"case": path.name, "modality": case.modality or "unknown", "model": label,
                      "dsc": dsc, "nsd": nsd, "seconds": seconds})
    latency = measure_latency(model, repeats=repeats)
    size = model_size(model)
    row = {
        "model": label, "backend": model.backend, "precision": model.precision, "params_M": size["params"] / 1e6,
        "encoder_GFLOPs": size["encoder_flops"] / 1e9, "decoder_GFLOPs_per_box": size["decoder_flops_per_box"] / 1e9,
        "file_MB": model_bytes(name) / 1e6,
        **latency,
        # This child's peak; ru_maxrss also covers the parent's RSS when it spawned the child, which is much smaller.
        "peak_RSS_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "head_accuracy": float(np.trace(confusion) / confusion.sum()) if confusion.sum() else "",
        "parent": variant_label(model_parent(name) or ""),
        "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags()),
    }
    return {"cases": cases, "row": row, "errors": errors, "confusion": confusion if confusion.sum() else None}


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
        if {row["model"], parent["model"]} <= timed_together:
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
    old_rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(open(out / "leaderboard.csv"))]
    this_run = {r["model"] for r in rows}
    kept = [c for c in csv.DictReader(open(out / "cases.csv")) if c["model"] not in this_run]
    return kept + [_fmt(c) for c in cases], [r for r in old_rows if r["model"] not in this_run] + rows


def check_mergeable(out: Path, files: list[Path]) -> None:
    """Before any work: --merge needs OUT's earlier cases to be among this run's (rows of other case sets do not
    compare)."""
    if not (out / "cases.csv").exists():
        return
    earlier = {c["case"] for c in csv.DictReader(open(out / "cases.csv"))}
    if not earlier <= {f.name for f in files}:
        raise SystemExit(f"error: --merge: {out / 'cases.csv'} was scored on other cases than this run's; "
                         "benchmark into another --out or with the same --data and --all / --cases-per-modality")


def main(argv: list[str] | None = None) -> int:
    from zoo.index import zoo_names

    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="directory of challenge npz files with gts (default: $MEDSEG_DATA, else ../shared/data/medseg-real/val)")
    parser.add_argument("--models", default=None, help="comma-separated zoo names or checkpoint paths (default: every zoo variant)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmark", help="output directory")
    parser.add_argument("--cases-per-modality", type=int, default=2, help="seeded sample size per modality")
    parser.add_argument("--all", action="store_true", help="every case instead of a sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for every variant")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per latency measurement (median)")
    parser.add_argument("--save-segs", type=Path, default=None, metavar="DIR",
                        help="also write each variant's segs npz files to DIR/<model>/")
    parser.add_argument("--cache-dir", type=Path, default=ENCODER_CACHE_DIR,
                        help="where image embeddings are kept for variants that share an encoder")
    parser.add_argument("--no-embedding-cache", action="store_true", help="embed every image anew for every variant")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's models to OUT's leaderboard (same cases), replacing their earlier rows")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")

    data_dir = args.data or default_data_dir()
    if not data_dir.is_dir():
        raise SystemExit(f"error: {data_dir}: not a directory")
    models = [m.strip() for m in (args.models.split(",") if args.models else zoo_names()) if m.strip()]
    files = select_cases(data_dir, None if args.all else args.cases_per_modality, args.seed)
    if args.merge:
        check_mergeable(args.out, files)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"benchmarking {', '.join(models)} on {len(files)} cases of {data_dir} with {args.threads} threads")

    results, failed = [], []
    context = multiprocessing.get_context("spawn")
    for name in tqdm(models, desc="models", unit="model"):
        segs_dir = args.save_segs / variant_label(name) if args.save_segs else None
        cache_dir = None if args.no_embedding_cache else args.cache_dir
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(benchmark_variant, name, files, args.threads, args.repeats, segs_dir, cache_dir).result()
        except Exception as err:  # a broken variant is reported; the others still run
            failed.append(name)
            tqdm.write(f"error: variant {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            tqdm.write("".join(traceback.format_exception(err)[-3:]), file=sys.stderr)
            continue
        for message in result["errors"]:
            tqdm.write(f"error: {message}", file=sys.stderr)
        results.append(result)

    if results:
        cases = [c for r in results for c in r["cases"]]
        rows = [leaderboard_row(r) for r in results]
        all_cases, all_rows = merge_previous(args.out, cases, rows) if args.merge else ([_fmt(c) for c in cases], rows)
        compare_with_parents(all_rows, {r["model"] for r in rows})
        write_csv_atomic(args.out / "cases.csv", all_cases, CASE_FIELDS)
        write_csv_atomic(args.out / "leaderboard.csv", [_fmt(r) for r in all_rows], LEADERBOARD_FIELDS)
        radar_plot(all_rows, args.out / "radar.png")
        latency_plot(all_rows, args.out / "latency_vs_dsc.png", args.threads)
        for result, row in zip(results, rows):
            if result["confusion"] is not None:
                confusion_plot(result["confusion"], args.out / f"confusion_{row['model']}.png",
                               f"{row['model']}: modality head on {int(result['confusion'].sum())} cases, "
                               f"accuracy {row['head_accuracy']:.3f}")
        for row in rows:
            print(f"{row['model']:>14}: DSC {row['dsc_mean_modalities']:.4f} NSD {row['nsd_mean_modalities']:.4f} "
                  f"(mean over modalities), 2D {row['latency_2d_ms']:.0f} ms, encoder {row['encoder_GFLOPs']:.1f} GFLOPs")
        print(f"wrote {args.out / 'leaderboard.csv'}, cases.csv, radar.png, latency_vs_dsc.png")
    if failed or any(r["errors"] for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
