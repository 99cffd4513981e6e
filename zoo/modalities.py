"""The 11 modalities of the CVPR24 "MedSAM on Laptop" challenge, and how a case's modality is read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MODALITIES: tuple[str, ...] = (
    "CT", "MR", "PET", "US", "X-Ray", "Dermoscopy", "Endoscopy", "Fundus", "Microscopy", "OCT", "Mammography",
)
MODALITY_ID: dict[str, int] = {name: i for i, name in enumerate(MODALITIES)}

# Spellings seen in challenge file names and npz keys, lower-cased, without separators.
_ALIASES = {re.sub(r"[^a-z]", "", name.lower()): name for name in MODALITIES}
_ALIASES.update({"xray": "X-Ray", "mri": "MR", "ultrasound": "US", "mammo": "Mammography"})


def canonical_modality(text: str) -> str | None:
    """'xray', 'X-Ray', 'XRay' -> 'X-Ray'; an unknown spelling -> None."""
    return _ALIASES.get(re.sub(r"[^a-z]", "", str(text).lower()))


def modality_from_name(name: str | Path) -> str | None:
    """Modality of a challenge file name, e.g. '2DBox_US_0525.npz' -> 'US',
    '3DBox_CT_0566.npz' -> 'CT', '2DBox_X-Ray_DC1000_x.npz' -> 'X-Ray'; None when the name carries none."""
    stem = Path(name).name
    match = re.match(r"^(?:2D|3D)Box_(.+?)_", stem) or re.match(r"^(?:2D|3D)Box_([^_.]+)", stem)
    return canonical_modality(match.group(1)) if match else None


def modality_id(name: str) -> int:
    """Index of a modality in MODALITIES (any accepted spelling); ValueError for an unknown one."""
    canonical = canonical_modality(name)
    if canonical is None:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}")
    return MODALITY_ID[canonical]


def prompt_modality(model, name: str | None) -> int | None:
    """The class prompt's modality id for a file of modality `name`: its own, where the name is a known modality
    (in training, calibration and benchmarks alike); None where it is not, or the model has no class prompt (a
    class-prompt model's decode then takes its head's guess)."""
    known = canonical_modality(name) if name and model.has_modality_head else None
    return MODALITY_ID[known] if known else None


def modality_confusion() -> np.ndarray:
    """An empty (11, 11) int64 confusion matrix of a modality head: rows true modality, columns predicted."""
    return np.zeros((len(MODALITIES), len(MODALITIES)), dtype=np.int64)


def head_accuracy(confusion: np.ndarray) -> float:
    """The fraction of a confusion matrix on its diagonal; nan for an empty one (no head, or no cases)."""
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")
