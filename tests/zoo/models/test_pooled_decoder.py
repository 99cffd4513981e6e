import copy
from dataclasses import replace

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention

import zoo.index
from tests.helpers import TINY, tiny_model
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import LIGHT_DECODER, ClassPromptSAM, ModelConfig
from zoo.models.flops import decoder_flops_per_box
from zoo.models.pooled_decoder import (
    PooledMaskDecoder,
    PooledTwoWayTransformer,
    attend_to_few_tokens,
    pool_tokens,
    upscaled_masks,
)
from zoo.models.weights import CheckpointError
from zoo.runtime.export import export_variant

SHAPE = dict(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
INPUTS = (torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64), torch.randn(3, 2, 256), torch.randn(3, 256, 64, 64))


def _decoders(stride):
    """SAM's mask decoder and the same weights with the pooled transformer."""
    torch.manual_seed(0)
    kwargs = dict(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    sam = MaskDecoder(transformer=TwoWayTransformer(**SHAPE), **kwargs).eval()
    pooled = PooledMaskDecoder(transformer=PooledTwoWayTransformer(token_stride=stride, **SHAPE), **kwargs).eval()
    pooled.load_state_dict(sam.state_dict())  # strict: no parameter is added or renamed
    return sam, pooled


def test_pool_tokens_is_the_mean_of_each_cell():
    tokens = torch.randn(2, 8 * 12, 5)  # (N, H*W, C), H = 8, W = 12
    pooled = pool_tokens(tokens, 8, 12, 4)
    grid = tokens.reshape(2, 8, 12, 5)
    assert pooled.shape == (2, 2 * 3, 5)
    assert torch.allclose(pooled[1, 1 * 3 + 2], grid[1, 4:8, 8:12].mean(dim=(0, 1)), atol=1e-6)
    assert pool_tokens(tokens, 8, 12, 1) is tokens


def test_attention_to_few_tokens_is_sams_attention():
    torch.manual_seed(0)
    attention = Attention(256, 8, downsample_rate=2).eval()
    q, k, v = torch.randn(3, 4096, 256), torch.randn(3, 7, 256), torch.randn(3, 7, 256)
    with torch.no_grad():
        assert torch.allclose(attend_to_few_tokens(attention, q, k, v), attention(q=q, k=k, v=v), atol=1e-5)


def test_upscaled_masks_are_sams_upscaling_and_mask_product():
    """SAM's order: upscale 4x through its output_upscaling, then the hypernetwork product per pixel."""
    sam, _ = _decoders(1)
    x, hyper_in = torch.randn(2, 256, 6, 5), torch.randn(2, 4, 32)
    with torch.no_grad():
        upscaled = sam.output_upscaling(x)
        theirs = (hyper_in @ upscaled.flatten(2)).reshape(2, 4, 24, 20)
        tokens = x.flatten(2).transpose(1, 2)  # (N, H*W, C) row-major, as the transformer returns them
        assert torch.allclose(upscaled_masks(sam.output_upscaling, hyper_in, tokens, 6, 5), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("multimask", [False, True])
def test_stride_one_is_sams_decoder(multimask):
    """Everything but the pooling is SAM's decoder computed in another order: with stride 1 the same masks."""
    sam, pooled = _decoders(1)
    with torch.no_grad():
        for ours, theirs in zip(pooled(*INPUTS, multimask_output=multimask), sam(*INPUTS, multimask_output=multimask)):
            assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


class _PooledKeys(torch.nn.Module):
    """An attention given the 64×64 image tokens as keys and values, fed their 2×2 means instead."""

    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, q, k, v):
        return self.attention(q=q, k=pool_tokens(k, 64, 64, 2), v=pool_tokens(v, 64, 64, 2))


def test_only_the_token_to_image_attention_is_pooled():
    """Stride 2 is SAM's transformer whose three token-to-image attentions see 2×2-pooled image tokens, and whose
    image tokens (what the output upscaling starts from) stay 64×64 and attend to the tokens unpooled."""
    sam, pooled = _decoders(2)
    reference = copy.deepcopy(sam.transformer)
    for layer in reference.layers:
        layer.cross_attn_token_to_image = _PooledKeys(layer.cross_attn_token_to_image)
    reference.final_attn_token_to_image = _PooledKeys(reference.final_attn_token_to_image)
    image, pe, tokens = INPUTS[0].expand(3, -1, -1, -1), INPUTS[1].expand(3, -1, -1, -1), INPUTS[2]
    with torch.no_grad():
        queries, keys = pooled.transformer(image, pe, tokens)
        expected_queries, expected_keys = reference(image, pe, tokens)
        sam_queries, _ = sam.transformer(image, pe, tokens)
    assert queries.shape == (3, 2, 256) and keys.shape == (3, 64 * 64, 256)
    assert torch.allclose(queries, expected_queries, atol=1e-4) and torch.allclose(keys, expected_keys, atol=1e-4)
    assert not torch.allclose(queries, sam_queries, atol=1e-2)


def test_bad_strides_are_refused():
    with pytest.raises(ValueError, match="token_stride"):
        PooledTwoWayTransformer(token_stride=0, **SHAPE)
    transformer = PooledTwoWayTransformer(token_stride=3, **SHAPE)
    with pytest.raises(ValueError, match="64×64 token grid cannot be pooled by 3"):
        transformer(*INPUTS[:2], INPUTS[2][:1])


def test_a_class_prompt_model_with_a_pooled_decoder_decodes_and_costs_less():
    sam_model = tiny_model()
    pooled_model = ClassPromptSAM(replace(TINY, decoder_token_stride=4)).eval()
    pooled_model.load_state_dict(sam_model.state_dict())
    assert isinstance(pooled_model.mask_decoder, PooledMaskDecoder)
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[10.0, 20.0, 100.0, 200.0], [50.0, 50.0, 60.0, 70.0]])
    with torch.no_grad():
        logits = pooled_model.decode(embedding, boxes, 3)
        assert logits.shape == (2, 1, 256, 256)
        # one box alone gets the mask it gets among others
        assert torch.allclose(pooled_model.decode(embedding, boxes[1:], 3), logits[1:], atol=1e-4)
    # SAM's decoder: 3.62 GFLOPs per box; six of its ten 4096-token projections 16× cheaper at stride 4, the other
    # four folded with the prompt tokens
    assert decoder_flops_per_box(sam_model) == pytest.approx(3.62e9, rel=0.01)
    assert decoder_flops_per_box(pooled_model) < 0.45 * decoder_flops_per_box(sam_model)


def test_checkpoint_keeps_the_stride_and_old_checkpoints_have_sams_decoder(tmp_path):
    model = ClassPromptSAM(replace(TINY, decoder_token_stride=2)).eval()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.config.decoder_token_stride == 2
    assert isinstance(loaded.mask_decoder.transformer, PooledTwoWayTransformer)
    legacy = TINY.to_dict()
    del legacy["decoder_token_stride"], legacy["decoder"]
    assert ModelConfig.from_dict(legacy) == TINY


def test_a_checkpoint_of_the_earlier_light_decoder_is_refused_by_name(tmp_path):
    """The earlier light decoder (both attentions pooled) wrote a stride but no decoder name; its weights would load
    into today's light decoder and give other masks."""
    path = save_checkpoint(tmp_path / "earlier.pt", ClassPromptSAM(replace(TINY, decoder_token_stride=2)).eval())
    payload = torch.load(path, weights_only=True)
    del payload["config"]["decoder"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"earlier\.pt: .*an earlier light decoder.*decoder_token_stride 2"):
        load_checkpoint(path)
    mixed = replace(TINY, decoder_token_stride=1).to_dict() | {"decoder": LIGHT_DECODER}
    with pytest.raises(ValueError, match="'pooled-tokens' with decoder_token_stride 1"):
        ModelConfig.from_dict(mixed)


def test_the_openvino_export_decodes_as_pytorch(tmp_path):
    model = ClassPromptSAM(replace(TINY, decoder_token_stride=4)).eval()
    model.load_state_dict(tiny_model().state_dict())
    exported = zoo.index.load(export_variant(model, {"parent": "tiny"}, tmp_path / "ov", "openvino"))
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[10.0, 20.0, 100.0, 200.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.inference_mode():
        assert torch.allclose(exported.decode(embedding, boxes, 2), model.decode(embedding, boxes, 2), atol=1e-3)
