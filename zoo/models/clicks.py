"""The click prompt, padded one way for every backend (issue #31).

A decode with clicks takes, beside its box, up to MAX_POINTS points (x, y) in the 256 frame with labels 1 (positive:
object) or 0 (negative: not object), and optionally the previous step's (N, 1, 256, 256) low-resolution logits as a
dense mask prompt. Every backend pads them here, the way SAM's ONNX export pads its points: to MAX_POINTS with the
point (0, 0) labelled -1, which SAM's prompt encoder embeds as its learned "not a point" token, and with a zero mask
and has_mask_input 0 where there is no previous mask. PyTorch, ONNX Runtime and OpenVINO therefore see the very same
tokens (the padding tokens take part in the decoder's attention, so a decode without them would differ), and the
click-trained decoder was trained on exactly these padded inputs.

More than MAX_POINTS clicks keep the latest MAX_POINTS: earlier ones act through the mask prompt, the logits they
produced (`keep_latest`). The interactive protocol (zoo.interactive) never gives more than 5 per slice.
"""

from __future__ import annotations

import torch

from zoo.data.preprocess import IMAGE_SIZE

MAX_POINTS = 5  # the clicks of the CVPR 2025 protocol: a fixed size for the exported graphs
PAD_LABEL = -1
POSITIVE, NEGATIVE = 1, 0


def keep_latest(points: torch.Tensor, labels: torch.Tensor, limit: int = MAX_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `limit` real clicks of each row (padding dropped first); rows keep their order."""
    if points.shape[1] <= limit:
        return points, labels
    rows_p, rows_l = [], []
    for p, l in zip(points, labels):
        real = l != PAD_LABEL
        p, l = p[real][-limit:], l[real][-limit:]
        rows_p.append(torch.cat([p, p.new_zeros(limit - len(p), 2)]))
        rows_l.append(torch.cat([l, l.new_full((limit - len(l),), PAD_LABEL)]))
    return torch.stack(rows_p), torch.stack(rows_l)


def pad_clicks(count: int, points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The click inputs of `count` boxes, padded: points (N, MAX_POINTS, 2) float32, point_labels (N, MAX_POINTS)
    float32 (-1: padding), mask_input (N, 1, 256, 256) float32 (zeros without one), has_mask_input (1,) float32.

    points (N, P, 2) or (P, 2) for every box alike; point_labels (N, P) or (P,): 1 positive, 0 negative, -1 ignored.
    ValueError on shapes that do not fit or labels other than -1, 0, 1."""
    if points is None:
        points = torch.zeros(count, 0, 2)
        point_labels = torch.zeros(count, 0)
    points = torch.as_tensor(points, dtype=torch.float32)
    if point_labels is None:
        raise ValueError("points need point_labels (1 positive, 0 negative, -1 padding)")
    labels = torch.as_tensor(point_labels, dtype=torch.float32)
    if points.ndim == 2:
        points, labels = points[None].expand(count, -1, -1), labels.reshape(1, -1).expand(count, -1)
    if points.ndim != 3 or points.shape[0] != count or points.shape[2] != 2 or labels.shape != points.shape[:2]:
        raise ValueError(f"points (N={count}, P, 2) need point_labels (N, P); got {tuple(points.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isin(labels, torch.tensor([PAD_LABEL, NEGATIVE, POSITIVE], dtype=torch.float32)).all():
        raise ValueError("point_labels must be 1 (positive), 0 (negative) or -1 (padding)")
    points, labels = keep_latest(points, labels)
    missing = MAX_POINTS - points.shape[1]
    points = torch.cat([points, points.new_zeros(count, missing, 2)], dim=1)
    labels = torch.cat([labels, labels.new_full((count, missing), PAD_LABEL)], dim=1)
    if mask_input is None:
        mask, has_mask = torch.zeros(count, 1, IMAGE_SIZE, IMAGE_SIZE), torch.zeros(1)
    else:
        mask = torch.as_tensor(mask_input, dtype=torch.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        if mask.shape[0] == 1 and count > 1:
            mask = mask.expand(count, -1, -1, -1)
        if mask.shape[0] != count:
            raise ValueError(f"mask_input must be (N={count}, 1, {IMAGE_SIZE}, {IMAGE_SIZE}); got {tuple(mask_input.shape)}")
        has_mask = torch.ones(1)
    return {"points": points.contiguous(), "point_labels": labels.contiguous(), "mask_input": mask.contiguous(),
            "has_mask_input": has_mask}
