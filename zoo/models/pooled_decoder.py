"""The light mask decoder: SAM's mask decoder, with a trained SAM decoder's weights, at 1.43 instead of 3.62 GFLOPs
per box (token stride 4; 1.44 until it computed only the mask it returns).

SAM's decoder spends most of its cost projecting the 64×64 = 4096 image tokens: ten 4096 × 256 × 128 projections.
- Six of them are the keys and values of the prompt tokens' attention to the image (twice in the blocks, once at
  the end). PooledTwoWayTransformer gives that attention the image tokens average-pooled by `token_stride` (16×16
  for stride 4), so they cost stride² times less. The image tokens' attention to the prompt tokens, which writes the
  box into every image token, stays at full resolution, and so do the image tokens: pooling that side too cost
  Microscopy 7 and X-Ray 11 DSC points on val (an object a few tokens wide shares its update with its neighbours);
  pooling the tokens' side alone cost nothing (docs/fast-model.md, "The light decoder").
- The other four meet only the 7 prompt tokens: attend_to_few_tokens computes that attention in a cheaper order.
PooledMaskDecoder is MaskDecoder around it, with two more changes of order (the positional encoding broadcast, the
output upscaling as upscaled_masks). No parameter is added or renamed, so a trained SAM decoder loads strictly; at
stride 1 the masks are SAM's up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention


def pool_tokens(tokens: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """(N, H*W, C) row-major tokens -> (N, H/s * W/s, C), each the mean of an s×s cell."""
    if stride == 1:
        return tokens
    n, _, c = tokens.shape
    # avg_pool2d rather than a mean over reshaped axes: OpenVINO runs that ReduceMean in its reference kernel
    # (16 ms of a 47 ms decoder), AvgPool in a JIT one.
    grid = tokens.reshape(n, height, width, c).permute(0, 3, 1, 2)
    return F.avg_pool2d(grid, stride).flatten(2).transpose(1, 2)


def attend_to_few_tokens(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM's attention(q=q, k=k, v=v) for many queries (the image tokens) over a few keys (the prompt tokens),
    computed in the order that costs least: q (N, L, C), k and v (N, T, C) -> (N, L, C).

    The prompt tokens' keys are folded into the query projection and their values into the output projection, so
    the L image tokens meet two (C × heads·T) products (4096 × 256 × 56 each for a box) instead of two projections
    to and from the attention's internal width (4096 × 256 × 128), and are never split into heads. The same sums
    as SAM's, in another order: equal up to float rounding."""
    n, length, dim = q.shape
    tokens, heads = k.shape[1], attention.num_heads
    head_dim = attention.internal_dim // heads
    keys = attention.k_proj(k).reshape(n, tokens, heads, head_dim).permute(0, 2, 3, 1)  # (N, H, d, T)
    values = attention.v_proj(v).reshape(n, tokens, heads, head_dim).transpose(1, 2)  # (N, H, T, d)
    q_weight = attention.q_proj.weight.reshape(heads, head_dim, dim).transpose(1, 2)  # (H, C, d)
    q_bias = attention.q_proj.bias.reshape(heads, 1, head_dim)  # (H, 1, d)
    scale = 1.0 / math.sqrt(head_dim)
    # scores of image token l, head h, prompt token t: (q_l W_h + b_h) · k_{h,t} / sqrt(d)
    fold = (q_weight @ keys * scale).permute(0, 2, 1, 3).reshape(n, dim, heads * tokens)  # (N, C, H*T)
    fold_bias = (q_bias @ keys * scale).reshape(n, 1, heads * tokens)  # (N, 1, H*T)
    scores = (q @ fold + fold_bias).reshape(n, length, heads, tokens)
    weights = torch.softmax(scores, dim=-1).reshape(n, length, heads * tokens)
    # out = sum over h, t of weight * v_{h,t} O_h + o, with O_h head h's rows of the output projection
    out_weight = attention.out_proj.weight.t().reshape(heads, head_dim, dim)  # (H, d, C)
    unfold = (values @ out_weight).reshape(n, heads * tokens, dim)  # (N, H*T, C)
    return weights @ unfold + attention.out_proj.bias


class PooledTwoWayTransformer(TwoWayTransformer):
    """TwoWayTransformer whose token-to-image attention runs on the `token_stride`× average-pooled image tokens.

    forward: image_embedding (N, C, H, W), image_pe (1 or N, C, H, W), point_embedding (N, T, C)
    -> queries (N, T, C), keys (N, H*W, C), as TwoWayTransformer's. H and W must be multiples of the stride."""

    def __init__(self, *, token_stride: int = 2, **kwargs):
        super().__init__(**kwargs)
        if token_stride < 1:
            raise ValueError(f"token_stride must be at least 1, got {token_stride}")
        self.token_stride = token_stride

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor):
        _, _, height, width = image_embedding.shape
        stride = self.token_stride
        if height % stride or width % stride:
            raise ValueError(f"a {height}×{width} token grid cannot be pooled by {stride}")

        def pool(tokens):
            return pool_tokens(tokens, height, width, stride)

        keys = image_embedding.flatten(2).transpose(1, 2)  # (N, H*W, C): full resolution throughout
        key_pe = image_pe.flatten(2).transpose(1, 2)
        coarse_pe = pool(key_pe)
        queries, query_pe = point_embedding, point_embedding
        for layer in self.layers:  # TwoWayAttentionBlock.forward, its token-to-image attention on the pooled grid
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)

            coarse = pool(keys)
            attn_out = layer.cross_attn_token_to_image(q=queries + query_pe, k=coarse + coarse_pe, v=coarse)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))

            attn_out = attend_to_few_tokens(layer.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries)
            keys = layer.norm4(keys + attn_out)

        coarse = pool(keys)
        attn_out = self.final_attn_token_to_image(q=queries + query_pe, k=coarse + coarse_pe, v=coarse)
        return self.norm_final_attn(queries + attn_out), keys


def upscaled_masks(upscaling: torch.nn.Sequential, hyper_in: torch.Tensor, keys: torch.Tensor, height: int,
                   width: int) -> torch.Tensor:
    """SAM's mask product hyper_in @ output_upscaling(keys as an image), computed on the tokens: keys (N, H*W, C)
    row-major, hyper_in (N, M, C2) -> masks (N, M, 4H, 4W).

    Each output pixel depends on one token only (two kernel-2, stride-2 transposed convolutions), and LayerNorm2d,
    GELU and the product act per pixel. So the transposed convolutions run as linear layers on the tokens, their 4
    output pixels per input pixel carried as rows, and only the M masks are put in place at the end: no pixel
    shuffle of 64 and 32 channels, no layout change between channels-first and tokens. The same sums as SAM's up to
    float rounding; on OpenVINO an FP32 click took 33 -> 26 ms (VNNI Xeon, docs/interactive.md)."""
    first, norm, activation, second, last_activation = upscaling
    n = keys.shape[0]
    c1, c2 = first.weight.shape[1], second.weight.shape[1]

    def as_linear(conv):  # ConvTranspose2d weight (C_in, C_out, 2, 2) -> linear rows ordered (i, j, c_out)
        return conv.weight.permute(2, 3, 1, 0).reshape(-1, conv.weight.shape[0]), conv.bias.repeat(4)

    y = F.linear(keys, *as_linear(first)).reshape(n, height * width * 4, c1)  # rows (y, x, i, j): pixel (2y+i, 2x+j)
    y = activation(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))  # LayerNorm2d: over channels, per pixel
    z = last_activation(F.linear(y, *as_linear(second))).reshape(n, height * width * 16, c2)  # rows (y, x, i, j, i', j')
    masks = (z @ hyper_in.transpose(1, 2)).reshape(n, height, width, 2, 2, 2, 2, -1)
    masks = masks.permute(0, 7, 1, 3, 5, 2, 4, 6)  # (N, M, y, i, i', x, j, j'): row 4y + 2i + i', column 4x + 2j + j'
    return masks.reshape(n, -1, 4 * height, 4 * width)


class PooledMaskDecoder(MaskDecoder):
    """SAM's MaskDecoder, with SAM's weights, for a PooledTwoWayTransformer: the light mask decoder.
    PooledMaskDecoder(transformer=PooledTwoWayTransformer(token_stride=2, ...), ...) takes MaskDecoder's arguments.

    predict_masks: image_embeddings (1 or N, C, S, S), image_pe (1, C, S, S), sparse (N, T, C), dense (N, C, S, S)
    -> masks (N, 4, 4S, 4S), iou predictions (N, 4), as MaskDecoder's; forward as MaskDecoder's too, computing only
    the masks it returns (SAM's computes all four, then keeps one or three). Two more changes of order, not of
    result: the positional encoding is broadcast over the boxes rather than copied per box (a graph runtime then
    folds it as a constant), and the output upscaling and mask product run on the tokens (upscaled_masks)."""

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool):
        kept = slice(1, None) if multimask_output else slice(0, 1)  # MaskDecoder.forward's selection
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings, kept)
        return masks, iou_pred[:, kept]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      kept: slice = slice(None)):
        """MaskDecoder.predict_masks; masks (N, len(kept), 4S, 4S) for the mask tokens `kept` only."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        src = image_embeddings + dense_prompt_embeddings  # (N, C, S, S): one image's embedding broadcast over N boxes
        h, w = src.shape[-2:]
        hs, keys = self.transformer(src, image_pe[:1], tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(self.num_mask_tokens)[kept]], dim=1)
        masks = upscaled_masks(self.output_upscaling, hyper_in, keys, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
