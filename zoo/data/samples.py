"""Training samples from challenge npz directories: 2D images and every n-th slice of 3D volumes.

A sample is (file, slice); its image goes through zoo.data.preprocess like at inference. Modalities can be
subsampled (the paper kept 1/50 of CT and 1/10 of the rest) and are balanced by sampling weights.
"""

from __future__ import annotations

import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch

from zoo.data.io import Case, CaseError, load_case, npz_inputs
from zoo.data.preprocess import IMAGE_SIZE, label_box, pad_to_square, preprocess_image, resized_shape, scale_boxes


class DataError(ValueError):
    """Training data that cannot be used; the message names the directory or file."""


@dataclass(frozen=True)
class Sample:
    path: Path
    z: int | None  # slice of a 3D volume; None for a 2D image
    modality: str


def parse_fractions(text: str | None) -> dict[str, float]:
    """'CT=0.02,default=0.1' -> {'CT': 0.02, 'default': 0.1}; None/'' keeps everything."""
    fractions = {"default": 1.0}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        fraction = float(value)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction for {name!r} must be in (0, 1], got {value}")
        fractions[name.strip()] = fraction
    return fractions


def npz_files(data_dirs: list[Path]) -> list[Path]:
    """The npz files of every data directory (zoo.data.io.npz_inputs names what else they hold)."""
    return [path for folder in data_dirs for path in npz_inputs(folder)[0]]


@lru_cache(maxsize=32)
def read_case(path: Path) -> Case:
    """Validated case, kept for the next samples of the same volume."""
    return load_case(path)


def round_robin(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    """`count` samples taken in turn from each modality, each modality's in a seeded order."""
    by_modality = defaultdict(list)
    for sample in samples:
        by_modality[sample.modality].append(sample)
    rng = random.Random(seed)
    for group in by_modality.values():
        rng.shuffle(group)
    chosen = []
    while len(chosen) < count and any(by_modality.values()):
        for modality in sorted(by_modality):
            if by_modality[modality] and len(chosen) < count:
                chosen.append(by_modality[modality].pop())
    return chosen


def find_samples(data_dirs: list[Path], slice_step: int = 5, fractions: dict[str, float] | None = None,
                 seed: int = 0, foreground_only: bool = False, skipped: list[str] | None = None,
                 max_samples: int | None = None) -> list[Sample]:
    """Every 2D image and every `slice_step`-th slice of every volume, then a seeded subsample per modality.
    `foreground_only` keeps only samples with a ground-truth label (what box-prompted fine-tuning can use);
    `max_samples` keeps at most that many, taken in turn from each modality (a quick try, a recipe's --smoke run).

    A file that cannot be used raises CaseError / DataError naming it; with a `skipped` list it is reported on
    stderr (one line), appended there and left out instead, so one bad file does not stop a long run."""
    by_modality: dict[str, list[Sample]] = defaultdict(list)
    for path in npz_files(data_dirs):
        try:
            case = read_case(path)  # CaseError names a corrupt file
            if foreground_only and case.gts is None:
                raise DataError(f"{path}: no 'gts' in this npz; fine-tuning needs ground truth")
        except (CaseError, DataError) as err:
            if skipped is None:
                raise
            skipped.append(str(err))
            print(f"error: {err}; file skipped", file=sys.stderr)
            continue
        modality = case.modality or "unknown"
        if case.is_3d:
            slices = range(0, case.image.shape[0], slice_step)
            if foreground_only:
                slices = [z for z in slices if case.gts[z].any()]
            by_modality[modality].extend(Sample(path, z, modality) for z in slices)
        elif not foreground_only or case.gts.any():
            by_modality[modality].append(Sample(path, None, modality))
    if not any(by_modality.values()):
        raise DataError(f"{', '.join(map(str, data_dirs))}: no usable samples"
                        + (f" ({len(skipped)} file(s) skipped)" if skipped else ""))
    fractions = fractions or {"default": 1.0}
    rng = random.Random(seed)
    samples = []
    for modality in sorted(by_modality):
        group = by_modality[modality]
        # a modality's volumes may have no object on the slices taken: its group is empty
        keep = min(len(group), max(1, round(len(group) * fractions.get(modality, fractions["default"]))))
        samples.extend(sorted(rng.sample(group, keep), key=lambda s: (str(s.path), s.z or 0)))
    if max_samples is not None and len(samples) > max_samples:
        kept = set(round_robin(samples, max_samples, seed))
        samples = [s for s in samples if s in kept]
    return samples


def balanced_weights(samples: list[Sample]) -> torch.Tensor:
    """Per-sample weights that give every modality the same total probability."""
    counts = Counter(s.modality for s in samples)
    return torch.tensor([1.0 / counts[s.modality] for s in samples], dtype=torch.double)


def sample_image(sample: Sample) -> np.ndarray:
    """(H, W, 3) image or (H, W) slice of a sample."""
    image = read_case(sample.path).image
    return image if sample.z is None else image[sample.z]


def sample_tensor(sample: Sample) -> torch.Tensor:
    """(3, 256, 256) preprocessed exactly as at inference."""
    return preprocess_image(sample_image(sample))[0][0]


def sample_labels(sample: Sample) -> np.ndarray:
    """(H, W) ground-truth label map of a sample (a 2D image's, or its slice's)."""
    case = read_case(sample.path)
    if case.gts is None:
        raise DataError(f"{sample.path}: no 'gts' in this npz")
    return case.gts if sample.z is None else case.gts[sample.z]


def _random_label(gts: np.ndarray, generator: torch.Generator):
    """One label (> 0) present in the label map, chosen with `generator`; None where there is none."""
    labels = np.unique(gts)
    labels = labels[labels > 0]
    if len(labels) == 0:
        return None
    return labels[torch.randint(len(labels), (1,), generator=generator).item()]


def mask_256(gts: np.ndarray, label) -> torch.Tensor:
    """One label's mask at 256 scale, resized and padded as the image: (1, 256, 256) float."""
    new_h, new_w = resized_shape(*gts.shape[:2])
    mask256 = pad_to_square(cv2.resize((gts == label).astype(np.uint8), (new_w, new_h), interpolation=cv2.INTER_NEAREST))
    return torch.from_numpy(mask256[None]).float()


def sample_object(sample: Sample, generator: torch.Generator, jitter: int = 0,
                  grow: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One ground-truth label present in the sample, chosen with `generator`: its 256-scale box (4,) and its mask at
    256 scale, resized and padded as the image (1, 256, 256) float; None where the sample has no ground truth.

    grow: each side of the box moves out by a random 0..grow pixels (fine-tuning, as LiteMedSAM was trained);
    jitter: each side moves by a random -jitter..+jitter pixels (distillation's mask losses); clipped to the image,
    at least 1 px wide and high."""
    found = sample_labelled_object(sample, generator, jitter, grow)
    return None if found is None else found[:2]


def sample_labelled_object(sample: Sample, generator: torch.Generator, jitter: int = 0,
                           grow: int = 0) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """sample_object's box and mask (the same draws), and the object's label in the sample's label map."""
    case = read_case(sample.path)
    if case.gts is None:
        return None
    gts = case.gts if sample.z is None else case.gts[sample.z]
    label = _random_label(gts, generator)
    if label is None:
        return None
    box = scale_boxes(label_box(gts, label)[None], gts.shape[:2])[0]
    if grow:
        box = box + torch.randint(0, grow + 1, (4,), generator=generator).numpy() * np.array([-1, -1, 1, 1])
    if jitter:
        box = box + torch.randint(-jitter, jitter + 1, (4,), generator=generator).numpy()
    if grow or jitter:
        box = np.clip(box, 0, IMAGE_SIZE - 1)
        box[2:] = np.maximum(box[2:], box[:2] + 1)
    return torch.as_tensor(box, dtype=torch.float32), mask_256(gts, label), int(label)


def object_crop(sample: Sample, label: int,
                window: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A crop (x0, y0, x1, y1), original pixels, of a sample, as zoo.interactive's zoom decodes it: its image
    preprocessed as at inference (3, 256, 256), the label's mask there (1, 256, 256) float and where the crop lies in
    its 256 frame (256, 256) bool."""
    x0, y0, x1, y1 = window
    tensor, (height, width) = preprocess_image(sample_image(sample)[y0:y1, x0:x1])
    area = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    area[:height, :width] = True
    return tensor[0], mask_256(sample_labels(sample)[y0:y1, x0:x1], label), area


def sample_area(sample: Sample) -> torch.Tensor:
    """(256, 256) bool: where a sample's image lies in the 256 frame (the rest is padding, cropped at inference)."""
    height, width = resized_shape(*sample_image(sample).shape[:2])
    area = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    area[:height, :width] = True
    return area


def flip(tensor: torch.Tensor, horizontal: bool, vertical: bool) -> torch.Tensor:
    """A (…, H, W) image, embedding or mask flipped left-right and/or up-down (training augmentation)."""
    dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
    return torch.flip(tensor, dims) if dims else tensor


def flip_box(box: torch.Tensor, horizontal: bool, vertical: bool, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A (4,) box [x0, y0, x1, y1] at 256 scale flipped as its image by `flip`."""
    x0, y0, x1, y1 = box.tolist()
    if horizontal:
        x0, x1 = size - 1 - x1, size - 1 - x0
    if vertical:
        y0, y1 = size - 1 - y1, size - 1 - y0
    return torch.tensor([x0, y0, x1, y1])


def flip_point(x: float, y: float, horizontal: bool, vertical: bool, size: int = IMAGE_SIZE) -> tuple[float, float]:
    """A point (x, y) at 256 scale flipped as its image by `flip` (as flip_box flips a box's corners; flipping twice
    gives it back)."""
    return (size - 1 - x if horizontal else x), (size - 1 - y if vertical else y)


def sample_box(sample: Sample, generator: torch.Generator, jitter: int = 0) -> torch.Tensor | None:
    """The box of `sample_object` (same draws); None where the sample has no ground truth."""
    found = sample_object(sample, generator, jitter)
    return None if found is None else found[0]
