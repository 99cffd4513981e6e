"""Pictures of a segmentation for a person to check: label contours over the image; a volume as a montage of its
labelled slices."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import cv2
import numpy as np

from zoo.data.io import atomic_path

MONTAGE_SLICES = 16


def label_colours(values: np.ndarray) -> dict[int, tuple[int, int, int]]:
    """A distinct RGB colour per label value (hues a golden angle apart, stable for a value)."""
    hues = {int(v): (int(v) * 0.618034) % 1.0 for v in values}
    return {v: tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, 1.0)) for v, hue in hues.items()}


def contour_overlay(image: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """Image (H, W) or (H, W, 3) uint8 and labels (H, W) -> (H, W, 3) uint8 RGB with each label's outline drawn."""
    canvas = np.ascontiguousarray(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image.copy())
    for value, colour in colours.items():
        mask = (labels == value).astype(np.uint8)
        if mask.any():
            contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour, thickness=1)
    return canvas


def montage_slices(labels: np.ndarray, count: int = MONTAGE_SLICES) -> np.ndarray:
    """Indices of up to `count` slices of a (D, H, W) label map, evenly spread over those with labels
    (over all slices when none has)."""
    labelled = np.flatnonzero(labels.reshape(len(labels), -1).any(axis=1))
    candidates = labelled if len(labelled) else np.arange(len(labels))
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return candidates[np.unique(np.round(picks).astype(int))]


def overlay_picture(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """2D: image (H, W[, 3]) + labels (H, W) -> contours over it. 3D: volume (D, H, W) + labels (D, H, W) -> a grid
    of up to 16 labelled slices, each with its slice index, (rows·H, cols·W, 3) uint8 RGB."""
    values = np.unique(labels)
    colours = label_colours(values[values != 0])
    if labels.ndim == 2:
        return contour_overlay(image, labels, colours)
    slices = montage_slices(labels)
    columns = math.ceil(math.sqrt(len(slices)))
    rows = math.ceil(len(slices) / columns)
    height, width = labels.shape[1:]
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, z in enumerate(slices):
        tile = contour_overlay(image[z], labels[z], colours)
        cv2.putText(tile, f"z={z}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        row, column = divmod(i, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = tile
    return grid


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes (encoded in memory, so nothing is written when it fails)."""
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
