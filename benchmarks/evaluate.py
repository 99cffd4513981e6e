"""Score existing segmentations against ground truth, as the challenge's compute_metrics workflow does.

    python -m benchmarks.evaluate --segs DIR --gts DIR --out metrics.csv [--skip-missing]

Every `segs` npz in --segs is scored against the `gts` npz of the same name in --gts: per-case DSC and NSD go to
--out, per-modality and overall means to <out>_summary.csv (and the terminal). A case of --gts without a
segmentation is named and scored DSC 0, NSD 0, as the challenge scores a missing output (exit code 1);
--skip-missing leaves such cases out of the means instead.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

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


def score_file(seg_path: Path, gt_path: Path) -> tuple[float, float]:
    """(DSC, NSD) of one segs npz against its ground-truth npz; CaseError naming the file on bad input."""
    gt = read_npz(gt_path)
    if "gts" not in gt:
        raise CaseError(gt_path, "missing key 'gts' (no ground truth to score against)")
    seg = read_npz(seg_path)
    if "segs" not in seg:
        raise CaseError(seg_path, f"missing key 'segs' (keys present: {sorted(seg)})")
    gts, segs = gt["gts"], seg["segs"]
    if gts.shape != segs.shape:
        raise CaseError(seg_path, f"segs shape {segs.shape} does not match gts shape {gts.shape} of {gt_path.name}")
    spacing = gt.get("spacing")
    if gts.ndim == 3 and (spacing is None or np.asarray(spacing).size != 3):
        raise CaseError(gt_path, "3D ground truth needs a 'spacing' of 3 numbers (z, y, x)")
    return case_scores(gts, segs, None if spacing is None else np.asarray(spacing, dtype=float).reshape(-1).tolist())


def summarize(rows: list[dict], group_key: str = "modality") -> list[dict]:
    """Per-group means of dsc/nsd, then 'mean over modalities' (mean of group means) and 'mean over cases'."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[group_key]].append(row)
    order = [m for m in MODALITIES if m in groups] + sorted(g for g in groups if g not in MODALITIES)
    summary = [{"group": g, "cases": len(groups[g]),
                "dsc": float(np.mean([r["dsc"] for r in groups[g]])),
                "nsd": float(np.mean([r["nsd"] for r in groups[g]]))} for g in order]
    if summary:
        summary.append({"group": "mean over modalities", "cases": len(rows),
                        "dsc": float(np.mean([s["dsc"] for s in summary])), "nsd": float(np.mean([s["nsd"] for s in summary]))})
        summary.append({"group": "mean over cases", "cases": len(rows),
                        "dsc": float(np.mean([r["dsc"] for r in rows])), "nsd": float(np.mean([r["nsd"] for r in rows]))})
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segs", required=True, type=Path, help="directory of npz files with 'segs'")
    parser.add_argument("--gts", required=True, type=Path, help="directory of npz files with 'gts' (and 'spacing' for 3D)")
    parser.add_argument("--out", required=True, type=Path, help="per-case CSV to write")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave cases without a segmentation out of the means (default: DSC 0, NSD 0)")
    return parser.parse_args(argv)


def score_cases(seg_files: list[Path], gts_dir: Path) -> tuple[list[dict], int]:
    """(one row per scored case, how many could not be scored: each named on stderr)."""
    rows, failures = [], 0
    for seg_path in tqdm(seg_files, desc="scoring", unit="case"):
        try:
            dsc, nsd = score_file(seg_path, gts_dir / seg_path.name)
        except CaseError as err:
            failures += 1
            tqdm.write(f"error: {err}", file=sys.stderr)
            continue
        rows.append({"case": seg_path.name, "modality": modality_from_name(seg_path.name) or "unknown",
                     "dsc": dsc, "nsd": nsd, "status": "ok"})
    return rows, failures


def write_tables(tables: list[tuple[Path, list[dict], list[str]]]) -> int:
    """Each (path, rows, fields) written atomically with scores to 4 decimals; how many could not be (named)."""
    failures = 0
    for path, table, fields in tables:
        try:
            write_csv_atomic(path, [{**r, "dsc": f"{r['dsc']:.4f}", "nsd": f"{r['nsd']:.4f}"} for r in table], fields)
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
    rows, failures = score_cases(seg_files, args.gts)
    if missing:
        scored = "left out (--skip-missing)" if args.skip_missing else "scored DSC 0, NSD 0"
        print(f"{'note' if args.skip_missing else 'error'}: {len(missing)} of {len(gt_files)} cases have no "
              f"segmentation in {args.segs} ({scored}): {', '.join(missing)}", file=sys.stderr)
        if not args.skip_missing:
            rows.extend({"case": name, "modality": modality_from_name(name) or "unknown", "dsc": 0.0, "nsd": 0.0,
                         "status": "missing"} for name in missing)
            rows.sort(key=lambda row: row["case"])
    summary = summarize(rows)
    failures += write_tables([(args.out, rows, ["case", "modality", "dsc", "nsd", "status"]),
                              (summary_csv, summary, SUMMARY_FIELDS)])
    for s in summary:
        print(f"{s['group']:>22}  n={s['cases']:<4} DSC {s['dsc']:.4f}  NSD {s['nsd']:.4f}")
    if failures:
        print(f"{failures} file(s) could not be scored or written", file=sys.stderr)
    return 1 if failures or (missing and not args.skip_missing) else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
