from dataclasses import replace

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

from zoo.checkpoint import load_checkpoint, save_checkpoint
from zoo.class_prompt import ClassPromptSAM, ModelConfig
from zoo.encoders import TinyViTConfig
from zoo.flops import decoder_flops_per_box
from zoo.pooled_decoder import PooledMaskDecoder

SMALL = ModelConfig(encoder=TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
                    class_prompt=True)


def _decoders(stride):
    torch.manual_seed(0)
    kwargs = dict(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                  transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    sam = MaskDecoder(**kwargs).eval()
    pooled = PooledMaskDecoder(token_stride=stride, **kwargs).eval()
    pooled.load_state_dict(sam.state_dict())  # the same weights: no parameter is added
    return sam, pooled


def test_stride_one_is_sams_decoder():
    sam, pooled = _decoders(1)
    inputs = (torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64), torch.randn(3, 2, 256), torch.randn(3, 256, 64, 64))
    with torch.no_grad():
        for ours, theirs in zip(pooled(*inputs, multimask_output=False), sam(*inputs, multimask_output=False)):
            assert torch.allclose(ours, theirs, atol=1e-5)


def test_pooled_shapes_and_cost():
    sam_model = ClassPromptSAM(SMALL).eval()
    pooled_model = ClassPromptSAM(replace(SMALL, decoder_token_stride=2)).eval()
    pooled_model.load_state_dict(sam_model.state_dict())
    assert isinstance(pooled_model.mask_decoder, PooledMaskDecoder)
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[10.0, 20.0, 100.0, 200.0], [50.0, 50.0, 60.0, 70.0]])
    with torch.no_grad():
        logits = pooled_model.decode(embedding, boxes, 3)
        assert logits.shape == (2, 1, 256, 256)
        # one box alone gets the mask it gets among others
        assert torch.allclose(pooled_model.decode(embedding, boxes[1:], 3), logits[1:], atol=1e-4)
    assert decoder_flops_per_box(pooled_model) < 0.45 * decoder_flops_per_box(sam_model)
    with pytest.raises(ValueError, match="token_stride"):
        _decoders(0)


def test_checkpoint_keeps_the_stride_and_old_checkpoints_have_sams_decoder(tmp_path):
    model = ClassPromptSAM(replace(SMALL, decoder_token_stride=2)).eval()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.config.decoder_token_stride == 2 and isinstance(loaded.mask_decoder, PooledMaskDecoder)
    legacy = SMALL.to_dict()
    del legacy["decoder_token_stride"]
    assert ModelConfig.from_dict(legacy) == SMALL
