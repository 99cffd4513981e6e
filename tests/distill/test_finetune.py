import shutil

import numpy as np
import pytest
import torch

from distill.finetune import build_model, main
from tests.helpers import TINY_STUDENT, empty_zoo, write_npz
from zoo.data.io import load_case, read_csv
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.predict import ModalityChoice, segment_case


def _case(path, rng, modality_shift):
    gts = np.zeros((40, 48), np.uint8)
    gts[5 + modality_shift : 25, 8:30] = 1
    gts[28:36, 30:44] = 2
    write_npz(path, imgs=rng.integers(0, 255, (40, 48, 3), dtype=np.uint8),
              boxes=np.array([[8, 5 + modality_shift, 29, 24], [30, 28, 43, 35]]), gts=gts)


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    for i in range(4):
        _case(train / f"2DBox_{'US' if i % 2 else 'Dermoscopy'}_{i}.npz", rng, i)
    volume_gts = np.zeros((12, 32, 32), np.uint8)
    volume_gts[2:9, 8:20, 10:24] = 1  # slices 0, 5, 10 taken; only slice 5 has an object
    write_npz(train / "3DBox_CT_0.npz", imgs=rng.integers(0, 255, (12, 32, 32), dtype=np.uint8),
              boxes=np.array([[10, 8, 2, 23, 19, 8]]), gts=volume_gts, spacing=np.array([2.0, 1.0, 1.0]))
    for i in range(2):
        _case(val / f"2DBox_US_v{i}.npz", rng, i)
    student = ClassPromptSAM(TINY_STUDENT)
    save_checkpoint(tmp_path / "tiny.pt", student, {"stage": "distill"})
    return tmp_path


def _args(data, out, *extra):
    return ["--init", str(data / "tiny.pt"), "--data", str(data / "train"), "--val", str(data / "val"),
            "--out", str(out), "--cache-dir", str(data / "cache"), "--batch-size", "2", "--epochs", "2",
            "--threads", "1", "--checkpoint-every", "1", "--head-epochs", "100", *extra]


def test_finetune_trains_selects_and_ships_a_zoo_checkpoint(data, capsys):
    out = data / "out"
    assert main(_args(data, out)) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert model.has_modality_head and meta["stage"] == "finetune" and meta["class_prompt"]
    assert meta["samples"] == 5 and meta["val_samples"] == 2  # the volume's empty slices are skipped
    assert set(meta["val"]["per_modality"]) == {"US"} and 0 <= meta["val"]["head_accuracy"] <= 1
    rows = read_csv(out / "val.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]  # one validation per epoch of 2 steps
    assert max(float(r["score"]) for r in rows) == pytest.approx(meta["val"]["score"], abs=1e-4)
    assert (out / "confusion.png").stat().st_size > 0
    # only the decoder, the head and the class prompt moved; the frozen encoder did not
    start = ClassPromptSAM(TINY_STUDENT)
    start.load_state_dict(load_checkpoint(data / "tiny.pt")[0].state_dict())
    final = model
    for name, before in start.image_encoder.state_dict().items():
        assert torch.equal(before, final.image_encoder.state_dict()[name]), name
    assert not torch.equal(start.mask_decoder.output_upscaling[0].weight, final.mask_decoder.output_upscaling[0].weight)
    # the result segments a case through the zoo's inference path, naming the modality it used
    case = load_case(data / "val" / "2DBox_US_v0.npz")
    result = segment_case(model, case, ModalityChoice(model, "head"))
    assert result.segs.shape == (40, 48) and result.modality_source == "head"


def test_resume_continues_exactly(data):
    full, cut = data / "full", data / "cut"
    assert main(_args(data, full)) == 0
    cut.mkdir()
    shutil.copy(full / "previous.pt", cut / "last.pt")  # the state after step 3 of 4, as a run killed there left it
    shutil.copy(full / "best.pt", cut / "best.pt")  # (and the best checkpoint it had written)
    assert main(_args(data, cut, "--resume")) == 0
    a, b = torch.load(full / "last.pt", weights_only=True), torch.load(cut / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert read_csv(full / "val.csv") == read_csv(cut / "val.csv")
    a, b = load_checkpoint(full / "best.pt"), load_checkpoint(cut / "best.pt")  # the head refit is seeded too
    assert torch.equal(a[0].modality_head.mlp[0].weight, b[0].modality_head.mlp[0].weight)


def test_ablation_has_no_class_prompt(data):
    out = data / "ablation"
    assert main(_args(data, out, "--no-class-prompt", "--epochs", "1")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert not model.has_modality_head and meta["class_prompt"] is False
    assert not (out / "confusion.png").exists()


def test_light_decoder_starts_from_the_checkpoints_decoder_and_is_kept(data):
    """--decoder-token-stride 2 fine-tunes the light decoder (zoo.models.pooled_decoder) from the init's SAM decoder
    weights; the result records the stride, so zoo.load rebuilds the light decoder."""
    from zoo.models.pooled_decoder import PooledTwoWayTransformer

    start = build_model(str(data / "tiny.pt"), class_prompt=True, decoder_token_stride=2)
    source, _ = load_checkpoint(data / "tiny.pt")
    assert isinstance(start.mask_decoder.transformer, PooledTwoWayTransformer)
    for name, tensor in source.mask_decoder.state_dict().items():
        assert torch.equal(tensor, start.mask_decoder.state_dict()[name]), name
    out = data / "light"
    assert main(_args(data, out, "--decoder-token-stride", "2", "--epochs", "1")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert isinstance(model.mask_decoder.transformer, PooledTwoWayTransformer) and meta["decoder_token_stride"] == 2


def test_build_model_from_litemedsam_starts_as_litemedsam(litemedsam):
    model = build_model("litemedsam", class_prompt=True)
    assert model.has_modality_head and not model.class_prompt.weight.any()
    for name, tensor in litemedsam.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_build_model_takes_a_zoo_checkpoint_by_name(data, tmp_path, monkeypatch):
    import zoo.index

    empty_zoo(tmp_path, monkeypatch)
    zoo.index.add_model("tiny", data / "tiny.pt")
    torch.manual_seed(0)  # the checkpoint has no head: each build makes a fresh one
    by_name = build_model("tiny", class_prompt=True)
    torch.manual_seed(0)
    by_path = build_model(str(data / "tiny.pt"), class_prompt=True)
    for name, tensor in by_path.state_dict().items():
        assert torch.equal(tensor, by_name.state_dict()[name]), name


def test_clear_errors(data, capsys):
    assert main(_args(data, data / "o", "--init", str(data / "missing.pt"))) == 2
    assert "missing.pt" in capsys.readouterr().err
    no_gts = data / "nogts"
    no_gts.mkdir()
    write_npz(no_gts / "2DBox_US_x.npz", imgs=np.zeros((8, 8, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    assert main(_args(data, data / "o2", "--data", str(no_gts))) == 2
    assert "2DBox_US_x.npz: no 'gts'" in capsys.readouterr().err


def test_fit_modality_head_learns_separable_modalities():
    from distill.finetune import fit_modality_head
    from zoo.models.class_prompt import ModalityHead

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 256, generator=g) * 0.05  # pooled embeddings are small and close together
    labels = torch.arange(3).repeat_interleave(20)
    features = centers[labels] + 0.01 * torch.randn(60, 256, generator=g)
    head = ModalityHead()
    fit_modality_head(head, features, labels, epochs=300)
    with torch.inference_mode():
        assert (head.mlp(features).argmax(dim=1) == labels).float().mean() == 1.0


def test_out_is_never_an_input(data, capsys):
    for out in (data / "train", data / "val", data):  # data folders; the folder holding the --init checkpoint
        assert main(_args(data, out)) == 2
        assert "--out is the" in capsys.readouterr().err
    assert not (data / "best.pt").exists() and not list((data / "train").glob("*.pt"))


def test_head_only_refits_the_head_of_a_distilled_student(data, capsys):
    out = data / "head"
    out.mkdir()
    # a distilled student with a head (from --decoder-from) but, as distillation writes it, no validation metadata
    before = build_model(str(data / "tiny.pt"), class_prompt=True)
    save_checkpoint(out / "best.pt", before, {"stage": "distill"})
    assert main(_args(data, out, "--head-only")) == 0
    model, meta = load_checkpoint(out / "best.pt")
    assert 0 <= meta["val"]["head_accuracy"] <= 1 and "modality head fitted" in capsys.readouterr().out
    assert not torch.equal(before.modality_head.mlp[0].weight, model.modality_head.mlp[0].weight)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.state_dict().items() if not k.startswith("modality_head."))
