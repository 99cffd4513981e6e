"""TinyViT image encoders, built by name from a config (as timm builds models from named configs).

The blocks are timm's (`timm.models.tiny_vit`: MBConv stages, windowed-attention blocks); what LiteMedSAM
changed is written here: a patch embedding of 1×1 convolutions that keeps the full 256² resolution, patch
mergings whose stride is configurable (LiteMedSAM's last one has stride 1), and SAM's neck to 256 channels.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import ConvLayer, ConvNorm, TinyVitStage

from zoo.models.pruning import narrow_encoder


@dataclass(frozen=True)
class TinyViTConfig:
    """Shape of a TinyViT encoder: (B, 3, img_size, img_size) -> (B, out_chans, embedding_size, embedding_size)."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # stride of the patch merging before stages 1, 2, 3
    patch_stride: int = 1  # stride of the patch embedding; 1 keeps the input resolution (LiteMedSAM)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    img_size: int = 256
    out_chans: int = 256
    embedding_size: int = 64
    # Hidden widths left by structured pruning (zoo.models.pruning): (unit name, kept channels / hidden units / heads).
    widths: tuple[tuple[str, int], ...] = ()
    # High-resolution path (HighResFusion): outputs of these stages are mixed into the embedding at its grid.
    fuse_stages: tuple[int, ...] = ()
    fuse_dim: int = 128

    def to_dict(self) -> dict:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        values["widths"] = dict(self.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "TinyViTConfig":
        values = dict(values)
        widths = tuple(sorted((str(k), int(v)) for k, v in values.pop("widths", {}).items()))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}, widths=widths)


ENCODER_CONFIGS: dict[str, TinyViTConfig] = {
    # LiteMedSAM's TinyViT-5M: stages at 256², 128², 64², 64²; 5.73 M parameters, ~75 GFLOPs per image.
    "litemedsam": TinyViTConfig(),
    # The same blocks after a stride-4 patch embedding: stages at 64², 32², 16², 16², the neck at 16² and the
    # embedding upsampled to 64². Windows of 8/16/8 tile those maps without padding (LiteMedSAM's 7/14/7 would pad
    # 32→35 and 16→28, 21); stage 2 then attends over the whole image. 4.57 GFLOPs (16× fewer), initialized from
    # LiteMedSAM (zoo.models.checkpoint.init_from_litemedsam).
    "fast": TinyViTConfig(patch_stride=4, window_sizes=(7, 8, 16, 8)),
    # `fast` plus a high-resolution path: stage 0 (64², 64 channels) and stage 1 (32², 128 channels) join the
    # upsampled 16² embedding at 64² (HighResFusion, +0.74 GFLOPs), so objects a few pixels wide reach the decoder.
    "fast_hr": TinyViTConfig(patch_stride=4, window_sizes=(7, 8, 16, 8), fuse_stages=(0, 1)),
}


class PatchEmbed(nn.Module):
    """Two conv-BN layers with GELU between: (B, 3, H, W) -> (B, C, H/s, W/s). The first conv patchifies with
    kernel = stride = s (LiteMedSAM: s = 1, a 1×1 conv), the second is 1×1."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int = 1):
        super().__init__()
        self.seq = nn.Sequential(
            ConvNorm(in_chans, embed_dim // 2, stride, stride, 0),
            nn.GELU(),
            ConvNorm(embed_dim // 2, embed_dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class PatchMerging(nn.Module):
    """1×1 conv, 3×3 depthwise conv of stride `stride`, 1×1 conv: (B, C, H, W) -> (B, C', H/s, W/s)."""

    def __init__(self, dim: int, out_dim: int, act_layer: type[nn.Module], stride: int = 2, device=None, dtype=None):
        super().__init__()  # device/dtype: accepted because timm's TinyVitStage passes them
        self.conv1 = ConvNorm(dim, out_dim, 1, 1, 0)
        self.act1 = act_layer()
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.act2 = act_layer()
        self.conv3 = ConvNorm(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class HighResFusion(nn.Module):
    """Fine detail from early stages added to a coarse embedding, as an FPN's lateral path adds it:
    embedding (B, C, S, S) and stage maps [(B, C_i, H_i, W_i)] -> (B, C, S, S).

    The maps are resized to S×S and concatenated with the embedding; a 1×1 conv to `hidden` channels, a 3×3
    depthwise conv, LayerNorm, GELU and a 1×1 conv back to C make a residual. That last conv starts at zero, so an
    encoder trained without the path computes exactly what it did when the path is added."""

    def __init__(self, dim: int, stage_dims: tuple[int, ...], hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim + sum(stage_dims), hidden, kernel_size=1)
        self.local = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.norm = LayerNorm2d(hidden)
        self.act = nn.GELU()
        self.expand = nn.Conv2d(hidden, dim, kernel_size=1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, embedding: torch.Tensor, stage_maps: list[torch.Tensor]) -> torch.Tensor:
        size = embedding.shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in stage_maps]
        mixed = self.act(self.norm(self.local(self.reduce(torch.cat([embedding, *maps], dim=1)))))
        return embedding + self.expand(mixed)


class TinyViTEncoder(nn.Module):
    """(B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64) image embedding for SAM's mask decoder."""

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        dims = config.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0], config.patch_stride)
        stages: list[nn.Module] = [ConvLayer(dims[0], config.depths[0], nn.GELU, conv_expand_ratio=config.mbconv_expand_ratio)]
        for i in range(1, len(dims)):
            stages.append(TinyVitStage(
                dim=dims[i - 1], out_dim=dims[i], depth=config.depths[i], num_heads=config.num_heads[i],
                window_size=config.window_sizes[i], mlp_ratio=config.mlp_ratio, local_conv_size=config.local_conv_size,
                downsample=partial(PatchMerging, stride=config.merge_strides[i - 1]), act_layer=nn.GELU,
            ))
        self.stages = nn.Sequential(*stages)
        narrow_encoder(self, dict(config.widths))
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )
        fused = tuple(dims[i] for i in config.fuse_stages)
        self.fusion = HighResFusion(config.out_chans, fused, config.fuse_dim) if fused else None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)
        stage_maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.config.fuse_stages:
                stage_maps.append(x)
        x = self.neck(x)
        if x.shape[-1] != self.config.embedding_size:
            # Students that run at a lower resolution apply the neck there (its 3×3 conv costs 4.8 GFLOPs at 64²)
            # and bring the embedding back to the decoder's 64×64 grid.
            x = F.interpolate(x, size=(self.config.embedding_size,) * 2, mode="bilinear", align_corners=False)
        if self.fusion is not None:
            x = self.fusion(x, stage_maps)
        return x


def litemedsam_encoder_key(key: str) -> str:
    """Map a key of LiteMedSAM's (MobileSAM-style) TinyViT state dict to this encoder's.

    LiteMedSAM keeps each patch merging at the end of stage i (`layers.i.downsample`); timm's stages start with
    it (`stages.i+1.downsample`). Its conv-BN pairs name the conv `c`; timm's name it `conv`.
    """
    key = re.sub(r"\.c\.(weight|bias)$", r".conv.\1", key)
    match = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
    if match:
        return f"stages.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    return re.sub(r"^layers\.", "stages.", key)
