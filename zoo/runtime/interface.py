"""The one interface every model variant answers, so that inference and benchmarks never special-case a backend.

`zoo.models.class_prompt.ClassPromptSAM` (PyTorch, pruned or not) implements it; exported runtimes (ONNX Runtime,
OpenVINO) implement the same methods on their own sessions.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SegmentationRuntime(Protocol):
    backend: str  # 'pytorch', 'onnxruntime', 'openvino'
    precision: str  # 'fp32', 'int8', ...
    has_modality_head: bool
    takes_clicks: bool  # whether decode takes points / mask_input (an exported variant without a clicks graph: no)
    clicks_trained: bool  # whether a click stage trained its decoder for them (else clicks may worsen masks)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, 256, 256) float32 in [0, 1] -> (1, 256, 64, 64) image embedding."""

    def encoder_fingerprint(self) -> str:
        """A hash of the encoder that is equal exactly when embed() gives equal outputs (keys cached embeddings)."""

    def predict_modality(self, embedding: torch.Tensor) -> torch.Tensor | None:
        """(1, 256, 64, 64) -> (1, 11) modality logits, or None for a model without a modality head."""

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, modality: int | None = None,
               points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None) -> torch.Tensor:
        """boxes (N, 4) [x0, y0, x1, y1] at 256 scale -> (N, 1, 256, 256) mask logits (> 0 is foreground).

        Clicks (issue #31): points (N, P, 2) (x, y) at 256 scale, point_labels (N, P) 1 positive / 0 negative / -1
        padding, mask_input (N, 1, 256, 256) the previous step's logits. Every backend pads them to
        zoo.models.clicks.MAX_POINTS with zoo.models.clicks.pad_clicks (the latest MAX_POINTS clicks are kept), so
        PyTorch and the graphs answer alike; without clicks and mask it is the box-only decode, unchanged. A model
        whose takes_clicks is False raises zoo.runtime.exported.NoClicksError on clicks."""
