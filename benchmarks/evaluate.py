"""Score existing segmentations against ground truth, as the challenge's compute_metrics workflow does.

    python -m benchmarks.evaluate --segs DIR --gts DIR --out metrics.csv [--skip-missing] [--clicks 5]

Every `segs` npz in --segs is scored against the `gts` npz of the same name in --gts: per-case DSC and NSD go to
--out, per-modality and overall means to <out>_summary.csv (and the terminal). A case of --gts without a
segmentation is named and scored DSC 0, NSD 0, as the challenge scores a missing output (exit code 1);
--skip-missing leaves such cases out of the means instead.

--clicks N scores the interactive protocol's saved steps (benchmarks.clicks; `benchmarks.run --clicks N --save-segs`
writes them, as the CVPR 2025 script does): each segs npz's `all_segs` holds the box step and N click steps; the
per-case CSV gets every step's DSC and NSD and DSC_AUC / NSD_AUC (zoo.interactive.interaction_auc), the summary the
means per modality of the AUCs and of the DSC after the last click. A missing case scores 0 at every step.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks.clicks import case_fields, step_scores
from zoo.cli import run_main
from zoo.data.io import (
    CaseError,
    WriteError,
    npz_inputs,
    read_npz,
    refuse_overwriting_inputs,
    write_csv_atomic,
)
from zoo.data.scoring import case_scores
from zoo.modalities import MODALITIES, modality_from_name

SUMMARY_FIELDS = ["group", "cases", "dsc", "nsd"]


def score_file(seg_path: Path, gt_path: Path, clicks: int = 0) -> tuple[float, float] | list[tuple[float, float]]:
    """(DSC, NSD) of one segs npz against its ground-truth npz; with `clicks`, [(DSC, NSD) of each step] of its
    all_segs (the box step first). CaseError naming the file on bad input."""
    gt = read_npz(gt_path)
    if "gts" not in gt:
        raise CaseError(gt_path, "missing key 'gts' (no ground truth to score against)")
    seg = read_npz(seg_path)
    key = "all_segs" if clicks else "segs"
    if key not in seg:
        raise CaseError(seg_path, f"missing key {key!r} (keys present: {sorted(seg)})")
    gts, steps = gt["gts"], (seg[key] if clicks else seg[key][None])
    if clicks and len(steps) != clicks + 1:
        raise CaseError(seg_path, f"all_segs holds {len(steps)} steps; --clicks {clicks} needs {clicks + 1} (the box and each click)")
    if gts.shape != steps.shape[1:]:
        raise CaseError(seg_path, f"{key} shape {steps.shape[1:]} does not match gts shape {gts.shape} of {gt_path.name}")
    spacing = gt.get("spacing")
    if gts.ndim == 3 and (spacing is None or np.asarray(spacing).size != 3):
        raise CaseError(gt_path, "3D ground truth needs a 'spacing' of 3 numbers (z, y, x)")
    spacing = None if spacing is None else np.asarray(spacing, dtype=float).reshape(-1).tolist()
    scores = [case_scores(gts, segs, spacing) for segs in steps]
    return scores if clicks else scores[0]


def summarize(rows: list[dict], group_key: str = "modality", metrics: tuple[str, ...] = ("dsc", "nsd")) -> list[dict]:
    """Per-group means of `metrics` (dsc, nsd), then 'mean over modalities' (mean of group means) and 'mean over
    cases'."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[group_key]].append(row)
    order = [m for m in MODALITIES if m in groups] + sorted(g for g in groups if g not in MODALITIES)
    summary = [{"group": g, "cases": len(groups[g]), **{k: float(np.mean([r[k] for r in groups[g]])) for k in metrics}}
               for g in order]
    if summary:
        summary.append({"group": "mean over modalities", "cases": len(rows),
                        **{k: float(np.mean([s[k] for s in summary])) for k in metrics}})
        summary.append({"group": "mean over cases", "cases": len(rows),
                        **{k: float(np.mean([r[k] for r in rows])) for k in metrics}})
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segs", required=True, type=Path, help="directory of npz files with 'segs'")
    parser.add_argument("--gts", required=True, type=Path, help="directory of npz files with 'gts' (and 'spacing' for 3D)")
    parser.add_argument("--out", required=True, type=Path, help="per-case CSV to write")
    parser.add_argument("--clicks", type=int, default=0, metavar="N",
                        help="score the interactive protocol's saved steps (all_segs: the box, then N clicks) and their AUCs")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave cases without a segmentation out of the means (default: DSC 0, NSD 0)")
    return parser.parse_args(argv)


def score_cases(seg_files: list[Path], gts_dir: Path, clicks: int = 0) -> tuple[list[dict], int]:
    """(one row per scored case, how many could not be scored: each named on stderr)."""
    rows, failures = [], 0
    for seg_path in tqdm(seg_files, desc="scoring", unit="case"):
        try:
            scores = score_file(seg_path, gts_dir / seg_path.name, clicks)
        except CaseError as err:
            failures += 1
            tqdm.write(f"error: {err}", file=sys.stderr)
            continue
        row = {"case": seg_path.name, "modality": modality_from_name(seg_path.name) or "unknown", "status": "ok"}
        if clicks:
            rows.append(step_scores(row, [d for d, _ in scores], [n for _, n in scores], clicks))
        else:
            rows.append({**row, "dsc": scores[0], "nsd": scores[1]})
    return rows, failures


def write_tables(tables: list[tuple[Path, list[dict], list[str]]]) -> int:
    """Each (path, rows, fields) written atomically with scores to 4 decimals; how many could not be (named)."""
    failures = 0
    for path, table, fields in tables:
        try:
            write_csv_atomic(path, [{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in table],
                             fields)
        except WriteError as err:  # named; the other tables are still written
            print(f"error: {err}", file=sys.stderr)
            failures += 1
    return failures


def run(args: argparse.Namespace) -> int:
    summary_csv = args.out.with_name(args.out.stem + "_summary.csv")
    seg_files, _ = npz_inputs(args.segs)
    gt_files, _ = npz_inputs(args.gts)
    for output in (args.out, summary_csv):
        refuse_overwriting_inputs(output, [args.segs, args.gts, *seg_files, *gt_files], "--out")
    missing = sorted({p.name for p in gt_files} - {p.name for p in seg_files})
    rows, failures = score_cases(seg_files, args.gts, args.clicks)
    if missing:
        scored = "left out (--skip-missing)" if args.skip_missing else "scored DSC 0, NSD 0"
        print(f"{'note' if args.skip_missing else 'error'}: {len(missing)} of {len(gt_files)} cases have no "
              f"segmentation in {args.segs} ({scored}): {', '.join(missing)}", file=sys.stderr)
        if not args.skip_missing:
            for name in missing:
                row = {"case": name, "modality": modality_from_name(name) or "unknown", "status": "missing"}
                zeros = [0.0] * (args.clicks + 1)
                rows.append(step_scores(row, zeros, zeros, args.clicks) if args.clicks else {**row, "dsc": 0.0, "nsd": 0.0})
            rows.sort(key=lambda row: row["case"])
    metrics = ("dsc", "nsd") + ((f"dsc_{args.clicks}", f"nsd_{args.clicks}", "dsc_auc", "nsd_auc") if args.clicks else ())
    summary = summarize(rows, metrics=metrics)
    click_fields = [f for f in case_fields(args.clicks) if f != "click_seconds"] if args.clicks else []
    failures += write_tables([(args.out, rows, ["case", "modality", "dsc", "nsd", *click_fields, "status"]),
                              (summary_csv, summary, SUMMARY_FIELDS + list(metrics[2:]))])
    for s in summary:
        print(f"{s['group']:>22}  n={s['cases']:<4} DSC {s['dsc']:.4f}  NSD {s['nsd']:.4f}"
              + (f"  after {args.clicks} clicks DSC {s[metrics[2]]:.4f}  DSC_AUC {s['dsc_auc']:.4f}  NSD_AUC "
                 f"{s['nsd_auc']:.4f}" if args.clicks else ""))
    if failures:
        print(f"{failures} file(s) could not be scored or written", file=sys.stderr)
    return 1 if failures or (missing and not args.skip_missing) else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
