"""DSC and NSD exactly as the CVPR24 "MedSAM on Laptop" evaluation (compute_metrics.py) computes them.

Per label 1..max(gt): Dice, and normalized surface Dice at tolerance 2 (DeepMind's surface-distance); a case's
score is the mean over labels. NSD uses the npz spacing (z, y, x) in mm for 3D; a 2D case is scored as a volume
of one slice with spacing [1, 1, 1], as the official script does. NSD is 0 when the case's DSC <= 0.2.
"""

from __future__ import annotations

import numpy as np
from surface_distance import compute_dice_coefficient, compute_surface_dice_at_tolerance, compute_surface_distances

NSD_TOLERANCE = 2.0
NSD_MIN_DSC = 0.2


def _label_masks(gts: np.ndarray, segs: np.ndarray):
    for label in range(1, int(gts.max()) + 1):
        yield gts == label, segs == label


def multi_class_dsc(gts: np.ndarray, segs: np.ndarray) -> float:
    """Mean Dice over labels 1..max(gts); a label absent from both masks is NaN (and makes the mean NaN)."""
    scores = [compute_dice_coefficient(gt, seg) if gt.any() or seg.any() else np.nan for gt, seg in _label_masks(gts, segs)]
    return float(np.mean(scores)) if scores else float("nan")


def multi_class_nsd(gts: np.ndarray, segs: np.ndarray, spacing, tolerance: float = NSD_TOLERANCE) -> float:
    """Mean normalized surface Dice over labels 1..max(gts); masks of 3 dimensions, spacing in mm per axis."""
    scores = []
    for gt, seg in _label_masks(gts, segs):
        if not (gt.any() and seg.any()):
            # No surface on one side: nothing lies within tolerance (0), or nothing to score (NaN). Decided here
            # because surface-distance 0.1 uses np.Inf for this case, which NumPy 2 removed.
            scores.append(np.nan if not (gt.any() or seg.any()) else 0.0)
            continue
        distances = compute_surface_distances(gt, seg, spacing_mm=list(spacing))
        scores.append(compute_surface_dice_at_tolerance(distances, tolerance))
    return float(np.mean(scores)) if scores else float("nan")


def case_scores(gts: np.ndarray, segs: np.ndarray, spacing=None) -> tuple[float, float]:
    """(DSC, NSD) of one case. gts/segs: (H, W) for 2D or (D, H, W) for 3D with `spacing` (z, y, x)."""
    if gts.shape != segs.shape:
        raise ValueError(f"segs shape {segs.shape} does not match gts shape {gts.shape}")
    dsc = multi_class_dsc(gts, segs)
    if not dsc > NSD_MIN_DSC:
        return dsc, 0.0
    if gts.ndim == 2:
        return dsc, multi_class_nsd(gts[..., None], segs[..., None], [1.0, 1.0, 1.0])
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"3D scoring needs a spacing of 3 numbers (z, y, x), got {spacing}")
    return dsc, multi_class_nsd(gts, segs, spacing)
