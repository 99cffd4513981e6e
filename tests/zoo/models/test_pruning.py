import pytest
import torch
from timm.models.tiny_vit import Attention, NormMlp

from tests.helpers import SMALL, small_encoder
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.encoders import TinyViTConfig
from zoo.models.pruning import head_channels, narrow_encoder, narrow_unit, prunable_units, unit_width, unit_widths


def silence(unit, drop):
    """Zero what reads the dropped channels / heads: the unit then computes what its narrowed copy computes."""
    with torch.no_grad():
        if isinstance(unit, NormMlp):
            unit.fc2.weight[:, drop] = 0
        elif isinstance(unit, Attention):
            for head in drop:
                unit.proj.weight[:, head_channels(unit, head)[1]] = 0
        else:
            unit.conv3.conv.weight[:, drop] = 0


def test_units_are_found_with_their_widths():
    widths = unit_widths(small_encoder())
    assert widths["stages.0.blocks.0"] == 64  # MBConv: 16 channels × expansion 4
    assert widths["stages.1.downsample"] == 32  # patch merging's middle channels
    assert widths["stages.1.blocks.0.mlp"] == 128
    assert widths["stages.3.blocks.0.attn"] == 3
    assert len(widths) == 1 + 3 * 3  # one MBConv; per later stage a merging, an attention and an MLP


def unit_input(encoder, name, image):
    """What the named unit receives when the encoder embeds `image`."""
    seen = []
    handle = prunable_units(encoder)[name].register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    with torch.no_grad():
        encoder(image)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["stages.0.blocks.0", "stages.2.downsample", "stages.1.blocks.0.mlp", "stages.3.blocks.0.attn"])
def test_narrowing_a_unit_equals_silencing_the_dropped_channels(name):
    x = unit_input(small_encoder(), name, torch.rand(1, 3, 256, 256))
    original, narrowed, silenced = (prunable_units(small_encoder())[name] for _ in range(3))
    width = unit_width(narrowed)
    keep = [0, width - 1] if width > 2 else [2]
    narrow_unit(narrowed, keep)
    silence(silenced, [i for i in range(width) if i not in keep])
    assert unit_width(narrowed) == len(keep)
    with torch.no_grad():
        expected, got = silenced(x), narrowed(x)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(original(x), got, atol=1e-4)  # the dropped channels mattered


def test_recorded_widths_rebuild_the_shapes_and_round_trip_through_a_checkpoint(tmp_path):
    widths = {"stages.0.blocks.0": 24, "stages.1.blocks.0.mlp": 40, "stages.3.blocks.0.attn": 1}
    config = ModelConfig(encoder=TinyViTConfig(**{**SMALL.__dict__, "widths": tuple(sorted(widths.items()))}), class_prompt=True)
    model = ClassPromptSAM(config).eval()
    assert {k: v for k, v in unit_widths(model.image_encoder).items() if k in widths} == widths
    assert ModelConfig.from_dict(config.to_dict()) == config
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "pruned.pt", model))
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(loaded.embed(image), model.embed(image))


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="not a prunable unit"):
        narrow_encoder(small_encoder(), {"neck.0": 8})
    with pytest.raises(ValueError, match="cannot keep"):
        narrow_unit(prunable_units(small_encoder())["stages.1.blocks.0.attn"], [5])
