import numpy as np
import pytest
import torch

import zoo.index
from compress.prune import head_importance, kept_width, main, prune_encoder, pruned_model
from tests.helpers import SMALL, small_encoder, write_npz
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.flops import encoder_flops
from zoo.models.pruning import prunable_units, unit_widths


def small_model(seed=0) -> ClassPromptSAM:
    torch.manual_seed(seed)
    model = ClassPromptSAM(ModelConfig(encoder=SMALL, class_prompt=True))
    model.image_encoder = small_encoder(seed)
    return model.eval()


def test_kept_width_removes_the_ratio_and_keeps_at_least_one():
    assert kept_width(256, 0.5) == 128
    assert kept_width(5, 0.5) == 3
    assert kept_width(1, 0.9) == 1


def test_pruning_halves_every_unit_and_keeps_the_strongest_heads():
    encoder = small_encoder()
    attn = prunable_units(encoder)["stages.3.blocks.0.attn"]
    with torch.no_grad():
        attn.qkv.weight[2 * attn.qkv.weight.shape[0] // 3 :] *= 10  # head 2 is by far the largest
    strongest_bias = attn.attention_biases[2].clone()
    assert int(head_importance(attn).argmax()) == 2
    before = unit_widths(encoder)
    after = prune_encoder(encoder, 0.5)
    assert after == {name: kept_width(width, 0.5) for name, width in before.items()}
    assert torch.equal(prunable_units(encoder)["stages.3.blocks.0.attn"].attention_biases[-1], strongest_bias)
    assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 256, 64, 64)


def test_pruned_model_records_its_widths_and_costs_fewer_flops():
    parent = small_model()
    model = pruned_model(parent, 0.5)
    assert dict(model.config.encoder.widths) == unit_widths(model.image_encoder)
    assert encoder_flops(model) < 0.9 * encoder_flops(parent)  # this small encoder's cost is mostly its neck
    assert parent.config.encoder.widths == ()  # the parent is untouched
    assert unit_widths(parent.image_encoder)["stages.1.blocks.0.mlp"] == 128


@pytest.fixture()
def train_dir(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, modality in enumerate(["US", "CT", "Dermoscopy", "US"]):
        write_npz(data / f"2DBox_{modality}_{i}.npz", imgs=rng.integers(0, 255, (48, 40, 3), dtype=np.uint8),
                  gts=np.pad(np.ones((10, 10), np.uint8), ((5, 33), (5, 25))), boxes=np.array([[5, 5, 14, 14]]))
    return data


def test_cli_prunes_recovers_resumes_and_ships_a_loadable_checkpoint(tmp_path, train_dir, capsys):
    parent_path = save_checkpoint(tmp_path / "parent.pt", small_model())
    before = parent_path.read_bytes()
    out = tmp_path / "pruned.pt"
    common = [str(parent_path), "--ratio", "0.5", "--data", str(train_dir), "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "2", "--checkpoint-every", "1", "--out", str(out)]
    assert main(common + ["--max-steps", "1"]) == 0
    first = torch.load(tmp_path / "pruned" / "last.pt", weights_only=True)
    assert first["step"] == 1
    out.unlink()
    assert main(common + ["--max-steps", "2", "--resume"]) == 0  # continues from step 1
    assert "after 2 recovery steps" in capsys.readouterr().out
    assert parent_path.read_bytes() == before
    model, meta = load_checkpoint(out)
    assert isinstance(zoo.index.load(out), ClassPromptSAM)
    assert meta["ratio"] == 0.5 and meta["recovery"]["steps"] == 2 and meta["encoder_flops"] < meta["parent_encoder_flops"]
    assert unit_widths(model.image_encoder)["stages.1.blocks.0.mlp"] == 64
    start = zoo.index.load(tmp_path / "pruned" / "pruned_start.pt")
    assert not torch.equal(model.image_encoder.stages[1].blocks[0].mlp.fc1.weight,
                           start.image_encoder.stages[1].blocks[0].mlp.fc1.weight)  # recovery trained the encoder
    with torch.no_grad():
        assert model.embed(torch.rand(1, 3, 256, 256)).shape == (1, 256, 64, 64)


def test_mask_loss_adds_the_parent_masks_to_the_recovery_objective(tmp_path, train_dir):
    parent_path = save_checkpoint(tmp_path / "parent.pt", small_model())
    common = [str(parent_path), "--data", str(train_dir), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "2",
              "--max-steps", "1"]
    assert main(common + ["--out", str(tmp_path / "plain.pt")]) == 0
    assert main(common + ["--mask-loss-weight", "1", "--out", str(tmp_path / "masks.pt")]) == 0
    plain, masks = (load_checkpoint(tmp_path / name)[1]["recovery"] for name in ("plain.pt", "masks.pt"))
    assert plain["mask_loss_weight"] == 0 and masks["mask_loss_weight"] == 1
    # the BCE against the parent's soft masks is at least their entropy, far above the embedding loss's variation
    assert masks["final_loss"] > plain["final_loss"]


def test_clear_errors_and_nothing_overwritten(tmp_path, train_dir, capsys):
    parent_path = save_checkpoint(tmp_path / "parent.pt", small_model())
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a.pt")]) == 2
    assert "missing.pt: model file not found" in capsys.readouterr().err
    assert main([str(parent_path), "--ratio", "1.5", "--epochs", "0", "--out", str(tmp_path / "b.pt")]) == 2
    assert "--ratio must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()
    existing = tmp_path / "c.pt"
    existing.write_bytes(b"keep me")
    assert main([str(parent_path), "--epochs", "0", "--out", str(existing)]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"


def test_bad_input_corpus(tmp_path, capsys):
    from tests.helpers import assert_reported, write_corpus

    bad, _ = write_corpus(tmp_path / "data")
    parent_path = save_checkpoint(tmp_path / "parent.pt", small_model())
    out = tmp_path / "pruned.pt"
    assert main([str(parent_path), "--data", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
                 "--max-steps", "1", "--batch-size", "2", "--out", str(out)]) == 1
    assert_reported(capsys.readouterr().err, bad)
    assert load_checkpoint(out)[1]["samples"] == 5 + 1  # five 2D images and slice 5, the one of 0, 5, 10 with an object


def test_out_and_work_are_never_inputs(tmp_path, train_dir, capsys):
    parent_path = save_checkpoint(tmp_path / "parent.pt", small_model())
    before = sorted(p.name for p in train_dir.iterdir())
    assert main([str(parent_path), "--data", str(train_dir), "--out", str(tmp_path / "p.pt"), "--work", str(train_dir)]) == 2
    assert "--work is the input" in capsys.readouterr().err
    assert main([str(parent_path), "--out", str(parent_path)]) == 2
    assert "--out is the input" in capsys.readouterr().err
    assert sorted(p.name for p in train_dir.iterdir()) == before and not (tmp_path / "p.pt").exists()
