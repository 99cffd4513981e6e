import numpy as np
import pytest
import torch

import zoo.index
from compress.quantize import main
from tests.helpers import empty_zoo, tiny_model, write_npz
from zoo.models.checkpoint import save_checkpoint
from zoo.runtime.exported import ExportedModel


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    calib = root / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i, modality in enumerate(["US", "CT", "Dermoscopy", "US"]):
        write_npz(calib / f"2DBox_{modality}_{i}.npz", imgs=rng.integers(0, 255, (48, 40, 3), dtype=np.uint8),
                  boxes=np.array([[2, 2, 20, 20]]))
    model_path = save_checkpoint(root / "tiny.pt", tiny_model())
    return root, calib, model_path


@pytest.mark.parametrize("backend, runtime, quantizer", [
    ("openvino", "openvino", "nncf"), ("onnxruntime", "onnxruntime", "onnxruntime"),
    pytest.param("optimum", "onnxruntime", "optimum-onnx", marks=pytest.mark.slow),
    pytest.param("inc", "inc", "neural-compressor-pt", marks=pytest.mark.slow)])
def test_int8_variant_is_calibrated_loaded_and_close_to_fp32(setup, backend, runtime, quantizer):
    root, calib, model_path = setup
    before = model_path.read_bytes()
    out = root / f"int8_{backend}"
    assert main([str(model_path), "--backend", backend, "--calib", str(calib), "--n-calib", "3", "--check", str(calib),
                 "--n-check", "2", "--out", str(out)]) == 0
    variant = zoo.index.load(out)
    assert isinstance(variant, ExportedModel) and variant.precision == "int8" and variant.backend == runtime
    metadata = variant.manifest["metadata"]
    assert metadata["calibration_images"] == 3 and metadata["quantizer"].startswith(quantizer + " ")
    assert 0 < metadata["embedding_rel_error"] < 0.5 and metadata["embedding_rel_error_images"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(n for e in variant.manifest["files"].values() for n in e["sha256"])])  # no leftovers
    assert model_path.read_bytes() == before
    if backend == "inc":  # a fresh process, as a user's: nothing has registered the quantized ops there
        import subprocess
        import sys
        from pathlib import Path

        code = f"import torch, zoo.index; print(tuple(zoo.index.load({str(out)!r}).embed(torch.rand(1, 3, 256, 256)).shape))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
        assert done.returncode == 0 and "(1, 256, 64, 64)" in done.stdout, done.stderr[-2000:]
    model = zoo.index.load(model_path)
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        fp32, int8 = model.embed(image), variant.embed(image)
        assert not torch.equal(fp32, int8)  # quantized for real
        assert ((int8 - fp32).norm() / fp32.norm()).item() < 0.5
        boxes = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
        assert torch.allclose(variant.decode(fp32, boxes, 1), model.decode(fp32, boxes, 1), atol=1e-3)  # FP32 decoder


def test_clear_errors_and_nothing_written(setup, tmp_path, capsys):
    root, calib, model_path = setup
    common = ["--calib", str(calib), "--n-calib", "2", "--check"]
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a")] + common) == 2
    assert "missing.pt: model file not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(model_path.read_bytes()[:1000])
    assert main([str(corrupt), "--out", str(tmp_path / "b")] + common) == 2
    assert "corrupt.pt: not a readable PyTorch checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(model_path), "--backend", "tensorrt"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(model_path), "--calib", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert "no .npz files" in capsys.readouterr().err
    constant = tmp_path / "constant"
    constant.mkdir()
    write_npz(constant / "2DBox_US_flat.npz", imgs=np.full((20, 20, 3), 7, np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    assert main([str(model_path), "--calib", str(constant), "--out", str(tmp_path / "d")]) == 2
    assert "no usable calibration images" in capsys.readouterr().err
    assert main([str(model_path), "--keep-fp32", "([", "--out", str(tmp_path / "e")] + common) == 2
    assert main([str(model_path), "--backend", "inc", "--keep-fp32", "neck", "--out", str(tmp_path / "f")] + common) == 2
    assert "--keep-fp32 is not offered for --backend inc" in capsys.readouterr().err
    assert main([str(model_path), "--backend", "optimum", "--model-type", "transformer", "--out", str(tmp_path / "g")] + common) == 2
    assert "NNCF's preset: --backend openvino only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["constant", "corrupt.pt", "empty"]


@pytest.mark.parametrize("flags, config", [(("avx2", "avx512f", "avx512_vnni"), "avx512_vnni"), (("avx2", "amx_int8"), "avx512_vnni"),
                                           (("avx2", "avx512f"), "avx512"), (("avx2",), "avx2"), ((), "arm64")])
def test_optimum_config_follows_the_cpu(flags, config):
    from compress.quantize import optimum_config_name

    assert optimum_config_name(flags) == config


def test_bad_input_corpus(setup, tmp_path, capsys):
    from tests.helpers import assert_reported, write_corpus

    _, _, model_path = setup
    bad, _ = write_corpus(tmp_path / "calib")
    out = tmp_path / "int8"
    assert main([str(model_path), "--calib", str(tmp_path / "calib"), "--n-calib", "8", "--check", "--out", str(out)]) == 1
    assert_reported(capsys.readouterr().err, bad)
    assert zoo.index.load(out).manifest["metadata"]["calibration_images"] == 6  # of 8 usable, the constant and the 1×1 image say nothing of ranges


def test_out_is_never_an_input(setup, tmp_path, capsys):
    root, calib, model_path = setup
    before = sorted(p.name for p in calib.iterdir())
    for out in (calib, model_path):
        assert main([str(model_path), "--calib", str(calib), "--n-calib", "2", "--out", str(out)]) == 2
        assert "--out is the input" in capsys.readouterr().err
    assert sorted(p.name for p in calib.iterdir()) == before


def test_ship_commits_the_int8_variant_to_the_zoo_with_where_it_is_faster(setup, tmp_path, monkeypatch):

    root, calib, model_path = setup
    empty_zoo(tmp_path, monkeypatch)
    out = tmp_path / "int8"
    assert main([str(model_path), "--calib", str(calib), "--n-calib", "2", "--check", str(calib), "--n-check", "1",
                 "--keep-fp32", "/neck/", "--out", str(out), "--ship", "tiny_openvino_int8"]) == 0
    (entry,) = zoo.index.read_index()
    assert entry["file"] == "tiny_openvino_int8/manifest.json" and entry["precision"] == "int8" and entry["backend"] == "openvino"
    assert "AVX512_VNNI" in entry["source"] and "embedding relative error" in entry["source"] and "/neck/" in entry["source"]
    shipped = zoo.index.load("tiny_openvino_int8")
    assert shipped.manifest["metadata"]["keep_fp32"] == ["/neck/"] and out.is_dir()  # copied, the variant kept


@pytest.mark.slow  # a zoo model exported, quantized and shipped (50 s); test_ship_commits_the_int8_variant_... stays in CI
def test_ship_of_a_zoo_models_variant_commits_only_the_int8_encoder(setup, tmp_path, monkeypatch, capsys):
    import json

    from zoo.models.weights import CheckpointError
    from zoo.runtime.exported import MANIFEST

    root, calib, model_path = setup
    index = empty_zoo(tmp_path, monkeypatch)
    zoo.index.add_model("tiny", model_path)
    out = tmp_path / "int8"
    # the parent given by its committed file's path: still recognised as the zoo's "tiny" (by its sha256)
    assert main([str(index.parent / "tiny.pt"), "--calib", str(calib), "--n-calib", "2", "--check", str(calib),
                 "--n-check", "1", "--out", str(out), "--ship", "tiny_openvino_int8"]) == 0
    entry = zoo.index.read_index()[1]
    assert entry["derived_from"] == "tiny" and entry["export"] == "openvino" and entry["precision"] == "int8"
    shipped = index.parent / "tiny_openvino_int8"
    assert sorted(p.name for p in shipped.iterdir()) == ["encoder_int8.bin", "encoder_int8.xml", MANIFEST]
    assert json.loads((shipped / MANIFEST).read_text())["from_parent"] == ["decoder", "clicks", "head"]
    with pytest.raises(CheckpointError, match="load it by its zoo name"):
        zoo.index.load(shipped)

    # Completed on load: the shipped INT8 encoder, the parent's FP32 decoder and head; answers as the full variant.
    loaded, full = zoo.index.load("tiny_openvino_int8"), ExportedModel(out)
    assert loaded.precision == "int8" and loaded.encoder_fingerprint() == full.encoder_fingerprint()
    assert loaded.takes_clicks  # the parent's FP32 clicks graph (#31) completes it too
    assert zoo.index.model_parent("tiny_openvino_int8") == "tiny"
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    embedding = loaded.embed(image)
    assert torch.equal(embedding, full.embed(image))
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0]])
    assert torch.allclose(loaded.decode(embedding, boxes, 2), full.decode(embedding, boxes, 2), atol=1e-4)
    assert torch.equal(loaded.predict_modality(embedding), full.predict_modality(embedding))

    # A new parent file: the INT8 encoder made from the old one is not paired with its decoder, and says so.
    capsys.readouterr()
    zoo.index.add_model("tiny", save_checkpoint(tmp_path / "new.pt", tiny_model(seed=1)), replace=True)
    assert "warning: tiny_openvino_int8 not re-measured" in capsys.readouterr().err  # the new parent ships
    with pytest.raises(CheckpointError, match="quantize the new tiny again"):
        zoo.index.load("tiny_openvino_int8")
    made_from = json.loads((shipped / MANIFEST).read_text())["metadata"]["parent_sha256"]
    assert zoo.index.model_parent("tiny_openvino_int8") == f"tiny@{made_from[:8]}"  # compared with what it was made from

    # A changed shipped encoder is refused by name before anything reads it.
    weights = shipped / "encoder_int8.bin"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="encoder_int8.bin: sha256"):
        zoo.index.load("tiny_openvino_int8")

    # Only an INT8 variant ships its quantized graphs alone; an FP32 export is listed with --export instead.
    from zoo.runtime.export import export_variant

    fp32 = export_variant(zoo.index.load("tiny"), {"parent": "tiny", "parent_sha256": zoo.index.read_index()[0]["sha256"]},
                          tmp_path / "fp32", "openvino")
    assert zoo.index.main(["add", "tiny_fp32", str(fp32), "--quantized-only"]) == 2
    assert "this one is fp32" in capsys.readouterr().err


@pytest.mark.slow  # two graphs through NNCF (40 s)
def test_decoder_int8_is_calibrated_on_boxes_of_the_ground_truth_and_ships_without_the_float_head(setup, tmp_path, monkeypatch, capsys):

    from zoo.runtime.exported import MANIFEST

    root, calib, model_path = setup
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    rng = np.random.default_rng(1)
    for i, modality in enumerate(["US", "CT", "Dermoscopy"]):
        gts = np.zeros((48, 40), np.uint8)
        gts[5 + i : 30, 4 : 20 + i] = 1
        write_npz(labelled / f"2DBox_{modality}_{i}.npz", imgs=rng.integers(0, 255, (48, 40, 3), dtype=np.uint8),
                  gts=gts, boxes=np.array([[4, 5, 20, 30]]))
    assert main([str(model_path), "--backend", "onnxruntime", "--decoder", "--calib", str(labelled), "--out", str(tmp_path / "o")]) == 2
    assert "openvino only" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([str(model_path), "--decoder", "--calib", str(calib), "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err  # calib's files have no gts: each is named, then the run stops
    assert "2DBox_CT_1.npz: no 'gts'" in err and "no usable samples" in err and not (tmp_path / "n").exists()

    index = empty_zoo(tmp_path, monkeypatch)
    zoo.index.add_model("tiny", model_path)
    out = tmp_path / "int8"
    assert main(["tiny", "--decoder", "--calib", str(labelled), "--n-calib", "3", "--check", str(labelled), "--n-check", "2",
                 "--out", str(out), "--ship", "tiny_int8"]) == 0
    metadata = ExportedModel(out).manifest["metadata"]
    assert metadata["quantized_parts"] == ["encoder", "decoder", "clicks"] and metadata["decoder_calibration_inputs"] == 3
    assert 0 < metadata["mask_dice_vs_fp32"] <= 1 and metadata["mask_dice_vs_fp32_inputs"] == 2
    assert metadata["clicks_calibration_inputs"] == 3 and 0 < metadata["click_mask_dice_vs_fp32"] <= 1
    shipped = index.parent / "tiny_int8"
    assert sorted(p.name for p in shipped.iterdir()) == ["clicks_int8.bin", "clicks_int8.xml", "decoder_int8.bin",
                                                         "decoder_int8.xml", "encoder_int8.bin", "encoder_int8.xml", MANIFEST]
    assert "decoder INT8 too (with clicks too)" in zoo.index.read_index()[1]["source"]
    model, variant = zoo.index.load("tiny"), zoo.index.load("tiny_int8")
    image, boxes = torch.rand(1, 3, 256, 256), torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    with torch.inference_mode():
        embedding = model.embed(image)
        int8, fp32 = variant.decode(embedding, boxes, 1), model.decode(embedding, boxes, 1)
        assert not torch.allclose(int8, fp32, atol=1e-3)  # the decoder quantized for real
        assert torch.allclose(variant.predict_modality(embedding), model.predict_modality(embedding), atol=1e-4)  # FP32 head
        # the clicks graph INT8 too: loosely like PyTorch (a random tiny model: its logits' sign is all that is checked)
        click = dict(points=torch.tensor([[[40.0, 50.0]]]), point_labels=torch.ones(1, 1), mask_input=fp32)
        int8, fp32 = variant.decode(embedding, boxes, 1, **click), model.decode(embedding, boxes, 1, **click)
        assert not torch.allclose(int8, fp32, atol=1e-3) and ((int8 > 0) == (fp32 > 0)).float().mean() > 0.8


def test_large_float_constants_of_an_int8_ir_are_stored_as_fp16_and_computed_in_f32():
    import openvino

    from compress.quantize import float_constants_as_fp16
    from zoo.runtime.backends import openvino_core

    ops = openvino.opset13
    values = np.random.default_rng(0).standard_normal((1, 4096)).astype(np.float32)
    x = ops.parameter([1, 4096], openvino.Type.f32, name="x")
    model = openvino.Model([ops.add(ops.add(x, ops.constant(values)), ops.constant(np.ones((1, 1), np.float32)))], [x])
    compressed = float_constants_as_fp16(model)
    kinds = sorted((str(n.get_element_type()), int(n.get_data().size)) for n in compressed.get_ops() if n.get_type_name() == "Constant")
    assert kinds == [("<Type: 'float16'>", 4096), ("<Type: 'float32'>", 1)]  # the small constant is left as it is
    out = openvino_core().compile_model(compressed, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(np.zeros((1, 4096), np.float32))[0]
    assert out.dtype == np.float32 and np.array_equal(out, values.astype(np.float16).astype(np.float32) + 1)
