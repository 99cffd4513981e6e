"""SAM's mask decoder with its two-way transformer on a coarser token grid: the light decoder of the fast model.

SAM's decoder spends three quarters of its 3.6 GFLOPs per box in the two-way transformer, whose image side has one
token per cell of the 64×64 embedding. Here the transformer sees the embedding average-pooled by `token_stride`
(32×32 = 1024 tokens for stride 2: 4× fewer FLOPs there), and what it changes on the image side is brought back to
the full 64×64 grid as a residual, so the output upscaling still starts from the full-resolution embedding and
small objects keep their detail. Every weight is SAM's: the decoder is initialized from a trained SAM decoder and
fine-tuned (distill.finetune) to the coarser attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder


class PooledMaskDecoder(MaskDecoder):
    """segment_anything's MaskDecoder whose transformer runs on a `token_stride`× average-pooled token grid.

    predict_masks: image_embeddings (1 or N, C, S, S), image_pe (1, C, S, S), sparse (N, T, C), dense (N, C, S, S)
    -> masks (N, 4, 4S, 4S), iou predictions (N, 4), as MaskDecoder's."""

    def __init__(self, *, token_stride: int = 2, **kwargs):
        super().__init__(**kwargs)
        if token_stride < 1:
            raise ValueError(f"token_stride must be at least 1, got {token_stride}")
        self.token_stride = token_stride

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor):
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        n = tokens.shape[0]
        if image_embeddings.shape[0] != n:
            image_embeddings = torch.repeat_interleave(image_embeddings, n, dim=0)
        full = image_embeddings + dense_prompt_embeddings  # (N, C, S, S)
        coarse = F.avg_pool2d(full, self.token_stride)  # (N, C, S/s, S/s)
        pos = F.avg_pool2d(image_pe, self.token_stride).expand(n, -1, -1, -1)
        b, c, h, w = coarse.shape

        hs, updated = self.transformer(coarse, pos, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        # The transformer's change to the image tokens, at full resolution, on top of the full embedding.
        change = updated.transpose(1, 2).reshape(b, c, h, w) - coarse
        src = full + F.interpolate(change, scale_factor=self.token_stride, mode="nearest")
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
