"""THE preprocessing, shared by inference, training, calibration and benchmarks.

It reproduces the official CVPR24 LiteMedSAM inference: resize the longest side to 256 (INTER_AREA),
min-max normalize to [0, 1], pad bottom/right to 256×256; boxes are scaled by the same factor and truncated
to integers; low-resolution logits are cropped to the unpadded area, resized back bilinearly and thresholded at 0.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 256


def resized_shape(height: int, width: int, target: int = IMAGE_SIZE) -> tuple[int, int]:
    """(new_height, new_width) after resizing the longest side to `target`, rounded as the official script does
    (but never 0: a 1×600 strip keeps one row where the official script would crash)."""
    scale = target / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_longest_side(image: np.ndarray, target: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W[, C]) -> (h, w[, C]) with max(h, w) == target, INTER_AREA."""
    new_h, new_w = resized_shape(image.shape[0], image.shape[1], target)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def pad_to_square(image: np.ndarray, target: int = IMAGE_SIZE) -> np.ndarray:
    """Zero-pad bottom and right: (h, w[, C]) -> (target, target[, C])."""
    pad = [(0, target - image.shape[0]), (0, target - image.shape[1])] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad)


def preprocess_image(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image (H, W) grey or (H, W, 3) uint8 -> ((1, 3, 256, 256) float32 tensor in [0, 1], (h, w) unpadded size).

    A grey image gives the same tensor as its 3-channel copy (INTER_AREA works per channel), at a third of the cost.
    The values are those of the official script (float64 min-max, then float32); the padding is written as zeros
    around them rather than by np.pad, and an image already 256 on its longest side is not resized (a copy).
    """
    resized = image if max(image.shape[:2]) == IMAGE_SIZE else resize_longest_side(image)
    low, high = float(resized.min()), float(resized.max())
    normalized = (resized.astype(np.float64) - low) / max(high - low, 1e-8)
    height, width = normalized.shape[:2]
    padded = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    # float64 -> float32 on assignment, as torch's .float(); a grey image broadcasts to the three channels
    padded[:, :height, :width] = normalized if normalized.ndim == 2 else normalized.transpose(2, 0, 1)
    return torch.from_numpy(padded)[None], (height, width)


def scale_boxes(boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """2D boxes (N, 4) [x0, y0, x1, y1] in original pixels -> (N, 4) float at 256 scale, truncated as the official script."""
    return np.trunc(np.asarray(boxes, dtype=np.float64) * (IMAGE_SIZE / max(original_size)))


def scale_points(points: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Clicks (N, 2) [x, y] in original pixels -> (N, 2) float at 256 scale: the boxes' factor, not truncated (a
    click is one pixel; SAM's prompt encoder takes it at that pixel's centre, as it takes a box's corners)."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 2) * (IMAGE_SIZE / max(original_size))


def label_box(labels: np.ndarray, label: int) -> np.ndarray:
    """The tight box (4,) [x0, y0, x1, y1] in original pixels around `label` in a 2D label map (H, W)."""
    ys, xs = np.nonzero(labels == label)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def box_from_mask(mask: np.ndarray, margin: int = 3) -> np.ndarray | None:
    """Box [x0, y0, x1, y1] at 256 scale around a mask given at original size, widened by `margin` pixels
    (clipped to 0..256); None when the mask is empty. Used to carry a box from one slice to the next."""
    mask256 = resize_longest_side(mask)
    if mask256.max() == 0:
        return None
    ys, xs = np.nonzero(mask256)
    return np.array([
        max(0, xs.min() - margin), max(0, ys.min() - margin),
        min(IMAGE_SIZE, xs.max() + margin), min(IMAGE_SIZE, ys.max() + margin),
    ], dtype=np.float64)


def postprocess_logits(logits: torch.Tensor, resized: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Low-res logits (N, 1, 256, 256) -> boolean masks (N, H, W): crop the padding, resize bilinearly, threshold at 0."""
    cropped = logits[..., : resized[0], : resized[1]]
    if tuple(cropped.shape[-2:]) != tuple(original_size):  # at the same size bilinear resizing is the identity
        cropped = F.interpolate(cropped, size=tuple(original_size), mode="bilinear", align_corners=False)
    return cropped[:, 0].detach().float().cpu().numpy() > 0  # numpy: a threshold too small for torch's thread pool
