"""Parameter and FLOP counts, measured the same way for every model (torch.utils.flop_counter)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.preprocess import IMAGE_SIZE


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(model, fn, *args) -> int:
    # Parameters are frozen while counting: FlopCounterMode's module tracker then records no autograd graph
    # (which would hold every activation), and it fails under no_grad.
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn(*args)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return counter.get_total_flops()


def encoder_flops(model) -> int:
    """FLOPs (multiply and add counted apart) of embedding one 256² image."""
    return _flops(model, model.embed, torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE))


def decoder_flops_per_box(model) -> int:
    """FLOPs of decoding one box (prompt encoder + mask decoder), given an image embedding."""
    size = model.config.encoder.embedding_size
    embedding = torch.rand(1, 256, size, size)
    return _flops(model, model.decode, embedding, torch.tensor([[40.0, 50.0, 180.0, 200.0]]), 0)


def model_size(model) -> dict[str, float]:
    """params, encoder_flops and decoder_flops_per_box of any variant: measured on a PyTorch model; an exported
    variant carries its PyTorch parent's, measured when it was exported (quantization keeps every operation)."""
    if isinstance(model, torch.nn.Module):
        return {"params": count_params(model), "encoder_flops": encoder_flops(model),
                "decoder_flops_per_box": decoder_flops_per_box(model)}
    return dict(model.size)
