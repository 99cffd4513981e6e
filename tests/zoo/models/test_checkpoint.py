import json
import os

import pytest
import torch

import zoo.index
from tests.helpers import TINY, tiny_model
from zoo.models.checkpoint import load_checkpoint, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.factory import build_litemedsam
from zoo.models.weights import CheckpointError, sha256_file


def test_round_trip_keeps_weights_config_and_metadata(tmp_path):
    model = tiny_model()
    path = save_checkpoint(tmp_path / "m.pt", model, {"epochs": 3, "val": {"dsc": 0.5}})
    loaded, meta = load_checkpoint(path)
    assert loaded.config == TINY
    assert meta["epochs"] == 3 and meta["val"]["dsc"] == 0.5 and "code_revision" in meta
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    model = tiny_model()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "h.pt", model, half=True))
    weight = loaded.class_prompt.weight
    assert weight.dtype == torch.float32
    assert torch.allclose(weight, model.class_prompt.weight, atol=1e-2)


def test_code_running_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "cp-tinyvit/1", "payload": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain pickle"])
def test_a_code_running_file_is_refused_as_such_with_no_advice_to_switch_the_check_off(tmp_path, kind):
    """A legacy (non-zip) checkpoint or a plain pickle that would run code was 'truncated or corrupt', and every
    message ended with PyTorch's advice to re-run torch.load with weights_only=False."""
    import pickle

    from tests.helpers import _RunsCode
    from zoo.models.weights import read_weights

    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"format": "cp-tinyvit/1", "state_dict": _RunsCode(marker)}
    if kind == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError) as caught:
        read_weights(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: it would run code when loaded (its pickle imports posix.system)")
    assert "weights_only" not in message and "Re-running" not in message and "\n" not in message
    assert not marker.exists()


def test_unreadable_files_say_why_without_pytorch_s_advice(tmp_path):
    import pickle

    from zoo.models.weights import read_weights

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))  # plain data, in a form torch.load does not read
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_weights(legacy)["w"], torch.zeros(2))  # a legacy file of tensors still loads
    (tmp_path / "cut.pt").write_bytes(legacy.read_bytes()[:60])
    for name, problem in (("plain.pkl", "not a PyTorch checkpoint torch.load reads safely"),
                          ("cut.pt", "not a readable PyTorch checkpoint, truncated or corrupt")):
        with pytest.raises(CheckpointError) as caught:
            read_weights(tmp_path / name)
        assert problem in str(caught.value) and "weights_only" not in str(caught.value), str(caught.value)


def test_truncated_missing_and_foreign_files(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", tiny_model())
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a cp-tinyvit checkpoint"):
        load_checkpoint(foreign)


def test_zoo_refuses_a_file_whose_hash_differs_from_the_index(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "shipped.pt", tiny_model())
    index = tmp_path / "index.json"
    entry = {"name": "tiny", "file": "shipped.pt", "sha256": sha256_file(path)}
    index.write_text(json.dumps({"models": [entry]}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", tmp_path)
    assert zoo.index.load("tiny").config == TINY
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not match the zoo index"):
        zoo.index.load("tiny")
    with pytest.raises(CheckpointError, match="unknown model 'nope'"):
        zoo.index.load("nope")


def test_a_variant_of_a_replaced_zoo_model_names_its_parent_by_hash(tmp_path, monkeypatch):
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"models": []}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", tmp_path)
    assert zoo.index.main(["add", "tiny", str(save_checkpoint(tmp_path / "v1.pt", tiny_model(0)))]) == 0
    first_sha = zoo.index.read_index()[0]["sha256"]
    by_path = str(tmp_path / "tiny.pt")  # as `compress.prune zoo/cp_tinyvit.pt` records its parent
    child = save_checkpoint(tmp_path / "child.pt", tiny_model(2), {"parent": "tiny", "parent_sha256": first_sha})
    child_by_path = save_checkpoint(tmp_path / "child2.pt", tiny_model(2), {"parent": by_path, "parent_sha256": first_sha})
    unhashed = save_checkpoint(tmp_path / "child3.pt", tiny_model(2), {"parent": "tiny"})
    assert [zoo.index.model_parent(c) for c in (child, child_by_path, unhashed)] == ["tiny", by_path, "tiny"]
    assert zoo.index.main(["add", "tiny", str(save_checkpoint(tmp_path / "v2.pt", tiny_model(1))), "--replace"]) == 0
    # the children were made from the first file: a leaderboard must not compare them with the second
    assert zoo.index.model_parent(child) == f"tiny@{first_sha[:8]}"
    assert zoo.index.model_parent(child_by_path) == f"{by_path}@{first_sha[:8]}"
    assert zoo.index.model_parent(unhashed) == "tiny"  # nothing recorded to tell the files apart
    asset_sha = sha256_file(zoo.index.model_file("litemedsam"))  # LiteMedSAM's parent file is the package asset
    from_litemedsam = save_checkpoint(tmp_path / "child4.pt", tiny_model(2),
                                      {"parent": "litemedsam", "parent_sha256": asset_sha})
    assert zoo.index.model_parent(from_litemedsam) == "litemedsam"


def test_shipped_index_lists_litemedsam_with_its_measured_size():
    entries = {e["name"]: e for e in zoo.index.read_index()}
    lite = entries["litemedsam"]
    assert lite["params_M"] == pytest.approx(9.791, abs=1e-3)
    assert lite["encoder_GFLOPs"] == pytest.approx(74.95, abs=0.05)
    for entry in entries.values():
        if entry["file"]:
            assert sha256_file(zoo.index.ZOO_DIR / entry["file"]) == entry["sha256"]
        elif entry["name"] != "litemedsam":  # no file of its own: made from a committed parent on first load
            parent = entry["derived_from"]  # LiteMedSAM's weights are the package asset, checked by its sha256
            assert entries[parent]["file"] or parent == "litemedsam", entry["name"]


def test_shipped_fast_student_is_the_high_resolution_config_at_a_fourteenth_of_litemedsams_flops():
    from zoo.models.encoders import ENCODER_CONFIGS
    from zoo.models.flops import decoder_flops_per_box, encoder_flops
    from zoo.models.pooled_decoder import PooledMaskDecoder

    entry = next(e for e in zoo.index.read_index() if e["name"] == "cp_tinyvit_fast")
    model = zoo.index.load("cp_tinyvit_fast")
    assert model.config.encoder == ENCODER_CONFIGS["fast_hr"] and model.has_modality_head and entry["stored_as"] == "fp16"
    assert encoder_flops(model) / 1e9 == pytest.approx(entry["encoder_GFLOPs"], abs=0.01) and entry["encoder_GFLOPs"] <= 74.95 / 14
    # and the light decoder: SAM's weights, the tokens' attention to the image on 4×4-pooled tokens, 2.5× fewer FLOPs
    assert isinstance(model.mask_decoder, PooledMaskDecoder) and model.config.decoder_token_stride == 4
    assert decoder_flops_per_box(model) / 1e9 == pytest.approx(entry["decoder_GFLOPs_per_box"], abs=0.01)
    assert entry["decoder_GFLOPs_per_box"] <= 3.62 / 2.5


def test_litemedsam_loads_by_name():
    model = zoo.index.load("litemedsam")
    assert not model.has_modality_head and not model.training
    assert not build_litemedsam(class_prompt=True).class_prompt.weight.any()


def test_fast_student_takes_every_litemedsam_weight():
    from zoo.models.encoders import ENCODER_CONFIGS
    from zoo.models.factory import init_from_litemedsam
    from zoo.models.weights import litemedsam_weights

    student = ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS["fast"])).eval()
    assert init_from_litemedsam(student) == []
    lite = build_litemedsam()
    image = torch.rand(1, 3, 256, 256)
    with torch.no_grad():  # the stride-4 patchify conv equals LiteMedSAM's 1×1 conv on a 4×4 average-pooled image
        ours = student.image_encoder.patch_embed.seq[0].conv(image)
        theirs = lite.image_encoder.patch_embed.seq[0].conv(torch.nn.functional.avg_pool2d(image, 4))
    assert torch.allclose(ours, theirs, atol=1e-6)
    # attention-bias tables of windows 7→8 and 14→16 are resampled, not left at zero
    for stage, shape in ((1, (4, 64)), (2, (5, 256)), (3, (10, 64))):
        key = f"image_encoder.stages.{stage}.blocks.0.attn.attention_biases"
        table, source = student.state_dict()[key], litemedsam_weights()[key]
        assert table.shape == shape and table.mean() == pytest.approx(source.mean().item(), abs=0.1)
    assert torch.equal(student.mask_decoder.state_dict()["iou_token.weight"], lite.mask_decoder.state_dict()["iou_token.weight"])


def test_encoder_from_litemedsam_leaves_the_encoder_out_and_brings_it_back(tmp_path, litemedsam):
    model = build_litemedsam(class_prompt=True)
    torch.nn.init.normal_(model.class_prompt.weight)
    path = save_checkpoint(tmp_path / "cp.pt", model, half=True, encoder_from="litemedsam")
    assert path.stat().st_size < 12e6  # decoder, head and prompt in float16; no encoder
    loaded, _ = load_checkpoint(path)
    for name, tensor in litemedsam.image_encoder.state_dict().items():
        assert torch.equal(loaded.image_encoder.state_dict()[name], tensor), name
    assert torch.equal(loaded.class_prompt.weight, model.class_prompt.weight.half().float())
    model.image_encoder.neck[0].weight.data += 1  # no longer LiteMedSAM's encoder: refused, nothing written
    with pytest.raises(ValueError, match="LiteMedSAM's, unchanged"):
        save_checkpoint(tmp_path / "wrong.pt", model, encoder_from="litemedsam")
    assert not (tmp_path / "wrong.pt").exists()


def test_index_add_ships_a_checkpoint_and_lists_it(tmp_path, monkeypatch, capsys):
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"models": []}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", tmp_path)
    source = save_checkpoint(tmp_path / "runs_best.pt", tiny_model(), {"stage": "finetune"})
    before = source.read_bytes()
    assert zoo.index.main(["add", "tiny_cp", str(source), "--half"]) == 0
    (entry,) = zoo.index.read_index()
    assert entry["name"] == "tiny_cp" and entry["stored_as"] == "fp16" and entry["precision"] == "fp32" and entry["params_M"] > 0
    assert entry["sha256"] == sha256_file(tmp_path / "tiny_cp.pt") and source.read_bytes() == before
    assert zoo.index.load("tiny_cp").config == TINY
    assert zoo.index.main(["add", "tiny_cp", str(source)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert zoo.index.main(["add", "tiny_cp", str(tmp_path / "missing.pt"), "--replace"]) == 2
    assert "missing.pt: model file not found" in capsys.readouterr().err


COMMANDS_TAKING_A_MODEL = {
    "zoo.predict": lambda evil, tmp: ["-i", str(tmp / "in"), "-o", str(tmp / "out"), "--model", str(evil)],
    "benchmarks.run": lambda evil, tmp: ["--data", str(tmp / "in"), "--models", str(evil), "--out", str(tmp / "out"),
                                         "--cache-dir", str(tmp / "cache")],
    "distill.run": lambda evil, tmp: ["--teacher", "medsam", "--teacher-checkpoint", str(evil), "--data", str(tmp / "in"),
                                      "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache")],
    "distill.finetune": lambda evil, tmp: ["--init", str(evil), "--data", str(tmp / "in"), "--val", str(tmp / "in"),
                                           "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache")],
    "compress.export": lambda evil, tmp: [str(evil), "--out", str(tmp / "out")],
    "compress.quantize": lambda evil, tmp: [str(evil), "--calib", str(tmp / "in"), "--out", str(tmp / "out")],
    "compress.prune": lambda evil, tmp: [str(evil), "--data", str(tmp / "in"), "--out", str(tmp / "out.pt")],
}


@pytest.mark.parametrize("command", COMMANDS_TAKING_A_MODEL)
def test_every_command_refuses_a_code_running_checkpoint(command, tmp_path, capsys):
    import importlib

    from tests.helpers import write_good, write_malicious_checkpoint

    write_good(tmp_path / "in")
    marker = tmp_path / "code_ran"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    main = importlib.import_module(command).main
    try:
        code = main(COMMANDS_TAKING_A_MODEL[command](evil, tmp_path))
        message = capsys.readouterr().err
    except SystemExit as exit:
        code, message = 2, str(exit.code)
    assert code in (1, 2)
    assert "evil.pt: refused: it would run code when loaded" in message and "weights_only" not in message
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists() and not list((tmp_path / "out").glob("**/*"))  # nothing written
