"""The one place a model is built from its config (as timm's create_model builds from a named config): loading a
checkpoint, LiteMedSAM, a student, a fine-tuning start and a pruned copy all call create_model; the rest here
starts a model from another's weights.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from timm.layers import resize_rel_pos_bias_table_levit

from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.encoders import ENCODER_CONFIGS
from zoo.models.weights import CheckpointError, litemedsam_weights


def create_model(config: ModelConfig | str = "litemedsam", **changes) -> ClassPromptSAM:
    """A freshly initialized model (zero class prompt) of `config`, or of the encoder config of that name
    (zoo.models.encoders.ENCODER_CONFIGS), with `changes` to the config (class_prompt, decoder_token_stride)."""
    if isinstance(config, str):
        if config not in ENCODER_CONFIGS:
            raise ValueError(f"unknown encoder config {config!r}; expected one of {', '.join(ENCODER_CONFIGS)}")
        config = ModelConfig(encoder=ENCODER_CONFIGS[config])
    return ClassPromptSAM(replace(config, **changes))


def build_litemedsam(class_prompt: bool = False) -> ClassPromptSAM:
    """LiteMedSAM with its pretrained weights; with `class_prompt`, plus a fresh modality head and a zero
    class-prompt table (the starting point of class-prompt fine-tuning)."""
    model = create_model(class_prompt=class_prompt)
    missing, unexpected = model.load_state_dict(litemedsam_weights(), strict=False)
    new_parts = ("modality_head.", "class_prompt.")
    if unexpected or any(not key.startswith(new_parts) for key in missing):
        raise CheckpointError(f"LiteMedSAM weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def init_from_litemedsam(model: ClassPromptSAM, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy LiteMedSAM's weights into a (student) model wherever the shapes match; returns the keys left as
    initialized. Two shape changes are bridged: a patchifying first conv of kernel k gets LiteMedSAM's 1×1 weights
    divided by k² in every tap (LiteMedSAM's conv on a k×k average-pooled image), and attention-bias tables of
    another window size are resampled bicubically (timm's LeViT/TinyViT rule). Keys starting with `skip` are
    left as initialized (a random encoder: skip=("image_encoder.",))."""
    own = model.state_dict()
    loaded = {}
    for key, value in litemedsam_weights().items():
        target = own.get(key)
        if target is None or (skip and key.startswith(skip)):
            continue
        if target.shape == value.shape:
            loaded[key] = value
        elif key == "image_encoder.patch_embed.seq.0.conv.weight" and value.shape[2:] == (1, 1) and target.shape[:2] == value.shape[:2]:
            kh, kw = target.shape[2:]
            loaded[key] = value.expand(-1, -1, kh, kw) / (kh * kw)
        elif key.endswith("attn.attention_biases") and target.shape[0] == value.shape[0]:
            loaded[key] = resize_rel_pos_bias_table_levit(value.T, (target.shape[1], target.shape[0])).T.contiguous()
    model.load_state_dict(loaded, strict=False)
    return sorted(k for k in own if k not in loaded)


def copy_matching_weights(model: torch.nn.Module, source: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Copy `source`'s weights into `model` wherever a key starting with one of `prefixes` exists in both with
    the same shape (a student gaining a new part keeps that part as initialized); returns the keys copied."""
    own = model.state_dict()
    copied = {k: v for k, v in source.state_dict().items()
              if k.startswith(prefixes) and k in own and own[k].shape == v.shape}
    model.load_state_dict(copied, strict=False)
    return sorted(copied)
