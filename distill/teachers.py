"""Teachers for distillation: MedSAM or any SAM ViT-B/L/H checkpoint (by path), the bundled LiteMedSAM, or any
zoo model by name or path (say cp_tinyvit, or cp_tinyvit_openvino: LiteMedSAM's encoder on OpenVINO FP32, about
3× faster on a CPU).

Every teacher answers `embed(image)`: (B, 3, 256, 256) in [0, 1], as zoo.data.preprocess makes it ->
(B, 256, 64, 64). SAM-family teachers see that same padded image upsampled to their 1024² input, so their
embedding is aligned pixel for pixel with the student's.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT

from zoo.models.factory import build_litemedsam
from zoo.models.weights import CheckpointError, read_weights

CHECKPOINT_ENV = "MEDSAM_CHECKPOINT"
TEACHERS = ("medsam", "sam", "litemedsam")
# segment_anything's registry: (embed_dim, depth) -> name.
SAM_REGISTRY_SIZES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
_WHERE = {
    "medsam": "MedSAM's medsam_vit_b.pth (bowang-lab/MedSAM, 'Model checkpoint' in its README)",
    "sam": "a SAM checkpoint such as sam_vit_b_01ec64.pth (facebookresearch/segment-anything, 'Model Checkpoints')",
}


def vit_shape_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """ImageEncoderViT arguments read off a SAM-style state dict's tensor shapes (ViT-B/L/H or smaller)."""
    patch = state["image_encoder.patch_embed.proj.weight"]
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = state["image_encoder.pos_embed"].shape[1]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    rel_rows = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in blocks]
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    global_blocks = [i for i, rows in zip(blocks, rel_rows) if rows == 2 * grid - 1]
    windowed = [rows for rows in rel_rows if rows != 2 * grid - 1]
    return dict(
        img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=len(blocks),
        num_heads=embed_dim // head_dim, global_attn_indexes=tuple(global_blocks),
        window_size=(windowed[0] + 1) // 2 if windowed else 0,
        out_chans=state["image_encoder.neck.0.weight"].shape[0],
    )


class SamTeacher(nn.Module):
    """A SAM-family ViT image encoder behind the teacher interface.

    MedSAM was trained on min-max normalized [0, 1] images; SAM on 0..255 images standardized by ImageNet stats."""

    PIXEL_MEAN = (123.675, 116.28, 103.53)
    PIXEL_STD = (58.395, 57.12, 57.375)

    def __init__(self, encoder: ImageEncoderViT, name: str, sam_normalization: bool):
        super().__init__()
        self.encoder = encoder
        self.name = name
        self.sam_normalization = sam_normalization
        self.register_buffer("pixel_mean", torch.tensor(self.PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""
        x = F.interpolate(image, size=(self.encoder.img_size,) * 2, mode="bilinear", align_corners=False)
        if self.sam_normalization:
            x = (x * 255.0 - self.pixel_mean) / self.pixel_std
        return self.encoder(x)


def build_sam_teacher(checkpoint: str | Path, kind: str = "medsam") -> SamTeacher:
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: {kind} teacher checkpoint not found; expected {_WHERE[kind]}")
    state = read_weights(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "image_encoder.patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: not a SAM/MedSAM state dict (no image_encoder.patch_embed.proj.weight)")
    shape = vit_shape_from_state_dict(state)
    encoder = ImageEncoderViT(
        **shape, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
    )
    encoder_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    try:
        encoder.load_state_dict(encoder_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: image encoder weights do not fit the ViT read off their shapes ({err})") from err
    name = SAM_REGISTRY_SIZES.get((shape["embed_dim"], shape["depth"]), f"vit_d{shape['embed_dim']}x{shape['depth']}")
    return SamTeacher(encoder, f"{kind}-{name}", sam_normalization=kind == "sam").eval()


def build_teacher(kind: str, checkpoint: str | Path | None = None):
    """'medsam' / 'sam' (checkpoint by path, or $MEDSAM_CHECKPOINT), 'litemedsam' (bundled), or a zoo model's name
    or path (anything zoo.index.load takes: its embed() is the teacher)."""
    if kind == "litemedsam":
        return build_litemedsam()
    if kind not in TEACHERS:
        from zoo.index import load, zoo_names  # at call time: zoo.index imports the exported runtimes

        if not (Path(kind).exists() or kind in zoo_names()):
            raise ValueError(f"unknown teacher {kind!r}; expected one of {', '.join(TEACHERS)}, a zoo model "
                             f"({', '.join(zoo_names())}) or a checkpoint path")
        return load(kind)
    checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if not checkpoint:
        raise CheckpointError(
            f"the {kind} teacher needs a checkpoint: pass --teacher-checkpoint PATH or set {CHECKPOINT_ENV}; "
            f"expected {_WHERE[kind]}"
        )
    return build_sam_teacher(checkpoint, kind)

