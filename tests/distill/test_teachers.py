
import pytest
import torch

from distill.teachers import build_teacher, vit_shape_from_state_dict
from tests.helpers import small_sam_checkpoint
from zoo.models.weights import CheckpointError


@pytest.mark.parametrize("kind", ["medsam", "sam"])
def test_small_random_checkpoint_builds_and_embeds(tmp_path, kind):
    encoder = small_sam_checkpoint(tmp_path / "sam.pth", wrap=kind == "sam")
    teacher = build_teacher(kind, tmp_path / "sam.pth")
    assert teacher.name == f"{kind}-vit_d32x3"
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        embedding = teacher.embed(image)
        x = torch.nn.functional.interpolate(image, size=(1024, 1024), mode="bilinear", align_corners=False)
        if kind == "sam":
            x = (x * 255 - teacher.pixel_mean) / teacher.pixel_std
        expected = encoder.eval()(x)
    assert embedding.shape == (1, 256, 64, 64)
    assert torch.allclose(embedding, expected, atol=1e-5)


def test_vit_b_layout_is_recognized():
    state = {"image_encoder.patch_embed.proj.weight": torch.empty(768, 3, 16, 16),
             "image_encoder.pos_embed": torch.empty(1, 64, 64, 768),
             "image_encoder.neck.0.weight": torch.empty(256, 768, 1, 1)}
    for i in range(12):
        rows = 127 if i in (2, 5, 8, 11) else 27
        state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = torch.empty(rows, 64)
    shape = vit_shape_from_state_dict(state)
    assert shape == dict(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                         global_attn_indexes=(2, 5, 8, 11), window_size=14, out_chans=256)


def test_missing_checkpoint_says_what_is_expected(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSAM_CHECKPOINT", raising=False)
    with pytest.raises(CheckpointError, match="MEDSAM_CHECKPOINT.*medsam_vit_b.pth"):
        build_teacher("medsam")
    with pytest.raises(CheckpointError, match="absent.pth: medsam teacher checkpoint not found"):
        build_teacher("medsam", tmp_path / "absent.pth")
    monkeypatch.setenv("MEDSAM_CHECKPOINT", str(tmp_path / "env.pth"))
    with pytest.raises(CheckpointError, match="env.pth"):
        build_teacher("medsam")


def test_wrong_files_are_refused(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a SAM/MedSAM state dict"):
        build_teacher("sam", tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable PyTorch checkpoint"):
        build_teacher("medsam", tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("gpt")


def test_litemedsam_teacher_is_bundled():
    assert build_teacher("litemedsam").embed(torch.zeros(1, 3, 256, 256)).shape == (1, 256, 64, 64)
