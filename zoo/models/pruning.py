"""Structured narrowing of a TinyViT encoder's hidden widths: the layers of a unit keep some of their channels.

Only widths inside a unit change, so every feature map between units keeps its shape:
  conv chain    (timm MBConv, PatchMerging) 1×1 conv -> 3×3 depthwise conv -> 1×1 conv: the middle channels
  NormMlp       fc1 -> GELU -> fc2: the hidden units
  Attention     qkv -> per-head attention (+ its relative-position bias rows) -> proj: whole heads
compress.prune chooses which channels and heads to keep (with torch-pruning's dependency graph); a pruned checkpoint
records each unit's kept width (TinyViTConfig.widths) and TinyViTEncoder rebuilds those shapes by keeping the first
`width` indices before its weights are loaded. Narrowing is plain slicing, so loading a model never imports
torch-pruning.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn
from timm.models.tiny_vit import Attention, ConvNorm, NormMlp


def is_conv_chain(module: nn.Module) -> bool:
    """conv1 (1×1) -> conv2 (depthwise) -> conv3 (1×1), all ConvNorm: timm's MBConv and our PatchMerging."""
    convs = [getattr(module, name, None) for name in ("conv1", "conv2", "conv3")]
    return all(isinstance(c, ConvNorm) for c in convs) and convs[1].conv.groups == convs[1].conv.in_channels


def prunable_units(encoder: nn.Module) -> dict[str, nn.Module]:
    """Every unit whose hidden width can shrink, by module name."""
    return {name: m for name, m in encoder.named_modules()
            if isinstance(m, (NormMlp, Attention)) or is_conv_chain(m)}


def unit_width(unit: nn.Module) -> int:
    """Channels of a conv chain's middle, hidden units of an MLP, heads of an attention."""
    if isinstance(unit, NormMlp):
        return unit.fc1.out_features
    if isinstance(unit, Attention):
        return unit.num_heads
    return unit.conv1.conv.out_channels


def head_channels(attn: Attention, head: int) -> tuple[list[int], list[int]]:
    """(qkv output rows, proj input columns) of one head: qkv's rows are laid out head by head as
    [q (key_dim), k (key_dim), v (val_dim)], proj's columns head by head as [v (val_dim)]."""
    per_head = 2 * attn.key_dim + attn.val_dim
    return (list(range(head * per_head, (head + 1) * per_head)),
            list(range(head * attn.val_dim, (head + 1) * attn.val_dim)))


def _keep(module: nn.Module, names: tuple[str, ...], index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of the module's named parameters and buffers (None ones are skipped)."""
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        kept = tensor.detach().index_select(dim, index).clone()
        setattr(module, name, nn.Parameter(kept, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else kept)


def _keep_outputs(layer: nn.Module, index: torch.Tensor) -> None:
    """A Linear's or conv's output channels, a BatchNorm's features (a depthwise conv's groups follow)."""
    if isinstance(layer, nn.BatchNorm2d):
        _keep(layer, ("weight", "bias", "running_mean", "running_var"), index, 0)
        layer.num_features = len(index)
    elif isinstance(layer, nn.Linear):
        _keep(layer, ("weight", "bias"), index, 0)
        layer.out_features = len(index)
    else:
        _keep(layer, ("weight", "bias"), index, 0)
        layer.out_channels = len(index)
        if layer.groups > 1:  # depthwise: its inputs are its outputs
            layer.in_channels = layer.groups = len(index)


def _keep_inputs(layer: nn.Module, index: torch.Tensor) -> None:
    _keep(layer, ("weight",), index, 1)
    if isinstance(layer, nn.Linear):
        layer.in_features = len(index)
    else:
        layer.in_channels = len(index)


@torch.no_grad()
def narrow_unit(unit: nn.Module, keep: Iterable[int]) -> None:
    """Keep only the listed channels / hidden units / heads of a unit, in place."""
    keep = sorted(set(int(i) for i in keep))
    width = unit_width(unit)
    if not keep or keep[0] < 0 or keep[-1] >= width:
        raise ValueError(f"cannot keep {keep[:8]}... of a unit of width {width}")
    if len(keep) == width:
        return
    index = torch.tensor(keep)
    if isinstance(unit, NormMlp):
        _keep_outputs(unit.fc1, index)
        _keep_inputs(unit.fc2, index)
    elif isinstance(unit, Attention):
        rows = torch.tensor([r for h in keep for r in head_channels(unit, h)[0]])
        cols = torch.tensor([c for h in keep for c in head_channels(unit, h)[1]])
        _keep_outputs(unit.qkv, rows)
        _keep_inputs(unit.proj, cols)
        unit.attention_biases = nn.Parameter(unit.attention_biases.data[keep].clone())
        unit.num_heads = len(keep)
        unit.out_dim = unit.val_dim * unit.num_heads
        unit.attention_bias_cache = {}
    else:
        for layer in (unit.conv1.conv, unit.conv1.bn, unit.conv2.conv, unit.conv2.bn):
            _keep_outputs(layer, index)
        _keep_inputs(unit.conv3.conv, index)


def narrow_encoder(encoder: nn.Module, widths: Mapping[str, int]) -> None:
    """Give the named units the recorded widths (their first `width` indices): the shapes of a pruned
    checkpoint, ready for its weights."""
    units = prunable_units(encoder)
    for name, width in widths.items():
        if name not in units:
            raise ValueError(f"pruned width recorded for {name!r}, which is not a prunable unit of this encoder")
        narrow_unit(units[name], range(width))


def unit_widths(encoder: nn.Module) -> dict[str, int]:
    return {name: unit_width(unit) for name, unit in prunable_units(encoder).items()}
