"""Losses: embedding MSE (distillation), mask-level distillation, and Dice + focal for fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between (B, 256, 64, 64) embeddings."""
    return F.mse_loss(student.float(), teacher.float())


def mask_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE of the student's mask logits against the teacher's mask probabilities, (N, 1, 256, 256) each."""
    return F.binary_cross_entropy_with_logits(student_logits.float(), torch.sigmoid(teacher_logits.float()))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, averaged; logits and binary target (N, 1, H, W)."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    dice = (2 * (prob * target).sum(1) + eps) / (prob.sum(1) + target.sum(1) + eps)
    return (1 - dice).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels."""
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_t) ** gamma * bce).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 1.0) -> torch.Tensor:
    """Dice + focal against ground-truth masks (N, 1, H, W), the fine-tuning loss."""
    return dice_loss(logits, target) + focal_weight * focal_loss(logits, target)
