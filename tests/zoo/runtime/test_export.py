import json

import numpy as np
import pytest
import torch

import zoo.index
import zoo.runtime.cpu
from tests.helpers import empty_zoo, tiny_model, write_npz
from zoo.data.io import load_case
from zoo.models.checkpoint import save_checkpoint
from zoo.models.clicks import MAX_POINTS
from zoo.models.flops import model_size
from zoo.models.weights import CheckpointError
from zoo.predict import ModalityChoice, segment_case
from zoo.runtime.export import export_variant, write_variant
from zoo.runtime.exported import ExportedModel, _OpenVINOGraph


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """exported(backend): one FP32 export of the tiny model per backend, made on first use and shared by the tests
    that only read it or copy it (an export costs 10 to 30 s on 2 cores)."""
    made = {}

    def get(backend: str):
        if backend not in made:
            made[backend] = export_variant(model, {"parent": "tiny"}, tmp_path_factory.mktemp("exported") / backend, backend)
        return made[backend]

    return get


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_variant_answers_like_the_pytorch_model(model, exported, backend, tmp_path):
    variant = zoo.index.load(exported(backend))
    assert isinstance(variant, ExportedModel) and variant.backend == backend and variant.precision == "fp32"
    assert variant.size == model_size(model)
    # What the runtime really computes in, read back from the compiled graphs: OpenVINO defaults to bf16 on
    # AVX512_BF16 / AMX CPUs, so an fp32 variant has to ask for f32 explicitly.
    assert {part: graph.inference_precision for part, graph in variant.graphs.items()} == dict.fromkeys(variant.graphs, "f32")
    image = torch.rand(1, 3, 256, 256)
    boxes = torch.tensor([[10.0, 10.0, 100.0, 100.0], [50.0, 60.0, 200.0, 220.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.inference_mode():
        embedding = model.embed(image)
        assert torch.allclose(variant.embed(image), embedding, atol=1e-4)
        assert torch.allclose(variant.predict_modality(embedding), model.predict_modality(embedding), atol=1e-4)
        for modality in (None, 4, torch.tensor([1, 2, 3])):
            assert torch.allclose(variant.decode(embedding, boxes, modality), model.decode(embedding, boxes, modality), atol=1e-3)
        assert variant.decode(embedding, boxes[:1], 2).shape == (1, 1, 256, 256)
    path = write_npz(tmp_path / "2DBox_US_x.npz", imgs=np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8),
                     boxes=np.array([[5, 5, 30, 30], [10, 20, 45, 38]]))
    case = load_case(path)
    ours = segment_case(variant, case, ModalityChoice(variant)).segs
    theirs = segment_case(model, case, ModalityChoice(model)).segs
    assert (ours == theirs).mean() > 0.99


def test_ctrl_c_after_two_openvino_graphs_were_dropped_in_the_order_they_came_is_a_clean_stop(tmp_path):
    """Each openvino.Core's CPU plugin swaps the thread's signal stack and unmaps its own when it goes: two graphs
    dropped first-in first-out left the main thread on an unmapped stack, and Ctrl-C was a segmentation fault (the
    CI run of stop 35). The graphs share one Core now. In a child process: a crash must not take the tests down."""
    import signal
    import subprocess
    import sys

    import openvino

    x = openvino.opset13.parameter([1, 4], openvino.Type.f32, name="x")
    openvino.save_model(openvino.Model([openvino.opset13.relu(x)], [x]), str(tmp_path / "relu.xml"))
    code = (f"import os, signal, gc, numpy as np\n"
            f"from zoo.runtime.exported import _OpenVINOGraph\n"
            f"first, second = (_OpenVINOGraph({str(tmp_path / 'relu.xml')!r}, 1, 'fp32') for _ in range(2))\n"
            f"first(x=np.ones((1, 4), np.float32)); second(x=np.ones((1, 4), np.float32))\n"
            f"del first; gc.collect(); del second; gc.collect()\n"
            f"signal.signal(signal.SIGINT, lambda *_: print('stopped cleanly'))\n"
            f"os.kill(os.getpid(), signal.SIGINT)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != -signal.SIGSEGV, "segmentation fault on SIGINT"
    assert done.returncode == 0 and "stopped cleanly" in done.stdout, done.stderr[-2000:]


def test_openvino_compiles_the_precision_the_manifest_names(exported):
    out = exported("openvino")
    encoder = out / json.loads((out / "manifest.json").read_text())["files"]["encoder"]["path"]
    assert _OpenVINOGraph(encoder, 1, "fp32").inference_precision == "f32"
    assert _OpenVINOGraph(encoder, 1, "int8").inference_precision == "f32"
    if zoo.runtime.cpu.openvino_supports_bf16():
        assert _OpenVINOGraph(encoder, 1, "bf16").inference_precision == "bf16"
    else:  # OpenVINO would compute f32: refused rather than mislabelled
        with pytest.raises(CheckpointError, match="no BF16 support in OpenVINO"):
            _OpenVINOGraph(encoder, 1, "bf16")
    with pytest.raises(CheckpointError, match="unknown precision 'fp8'"):
        _OpenVINOGraph(encoder, 1, "fp8")


def test_openvino_runs_one_box_on_a_copy_compiled_for_it(model, exported):
    """A call with one box (every click) runs a static-shape copy of the graph, compiled on its first call, with the
    same precision: the same logits as the dynamic graph gives that box among others; graphs without a dynamic axis
    (the encoder) have no copy."""
    variant = ExportedModel(exported("openvino"))
    decoder, clicks, encoder = (variant.graphs[part] for part in ("decoder", "clicks", "encoder"))
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[10.0, 10.0, 100.0, 100.0], [50.0, 60.0, 200.0, 220.0]])
    with torch.inference_mode():
        variant.embed(torch.rand(1, 3, 256, 256))
        both = variant.decode(embedding, boxes, 3)
        assert decoder.one_box is None and encoder.one_box is None
        one = variant.decode(embedding, boxes[1:], 3)
        assert torch.allclose(one, both[1:], atol=1e-4) and torch.allclose(one, model.decode(embedding, boxes[1:], 3), atol=1e-3)
        compiled, _ = decoder.one_box
        assert all(port.get_partial_shape().is_static for port in compiled.inputs)
        assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        click = {"points": torch.tensor([[[60.0, 70.0]]]), "point_labels": torch.tensor([[1.0]]),
                 "mask_input": torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(2))}
        assert clicks.one_box is None
        ours = variant.decode(embedding, boxes[:1], 3, **click)
        assert clicks.one_box is not None and encoder.one_box is None
        assert torch.allclose(ours, model.decode(embedding, boxes[:1], 3, **click), atol=1e-3)
        assert variant.decode(embedding, boxes, 3).shape == (2, 1, 256, 256)  # two boxes: the dynamic graph still
        again = variant.decode(embedding, boxes[:1], 3, **click)  # outputs are the caller's: the next call keeps them
        assert torch.equal(again, ours) and not torch.equal(variant.decode(embedding, boxes[1:], 3, **click), ours)


def test_a_changed_graph_file_is_refused(model, tmp_path):
    out = export_variant(model, {}, tmp_path / "v", "onnxruntime")
    graph = out / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="decoder.onnx: sha256 does not match"):
        ExportedModel(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable manifest"):
        ExportedModel(out)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ExportedModel(tmp_path)


def test_out_and_a_shipped_copy_are_never_their_input(model, tmp_path, monkeypatch, capsys):
    import compress.export  # the export CLI (zoo.runtime.export's command)

    source = save_checkpoint(tmp_path / "tiny.pt", model)
    before = source.read_bytes()
    assert compress.export.main([str(source), "--backend", "onnxruntime", "--out", str(source)]) == 2
    assert "--out is the input" in capsys.readouterr().err
    index = tmp_path / "index.json"  # a zoo whose folder holds the checkpoint: `add tiny tiny.pt` would replace it
    index.write_text(json.dumps({"models": []}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", tmp_path)
    assert zoo.index.main(["add", "tiny", str(source), "--half"]) == 2
    assert "NAME is the input" in capsys.readouterr().err
    assert source.read_bytes() == before and zoo.index.read_index() == []


def test_nothing_is_overwritten_and_a_failed_export_leaves_nothing(model, tmp_path):
    out = export_variant(model, {}, tmp_path / "v", "onnxruntime")
    before = json.loads((out / "manifest.json").read_text())
    with pytest.raises(FileExistsError):
        export_variant(model, {}, out, "onnxruntime")
    assert json.loads((out / "manifest.json").read_text()) == before

    def failing(folder):
        (folder / "half-written.onnx").write_bytes(b"x")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError):
        write_variant(tmp_path / "w", model, failing, "onnxruntime", "fp32", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_a_staging_folder_left_by_kill_9_is_removed_by_the_next_export_and_a_live_one_is_kept(model, tmp_path):
    """kill -9 during a first-load export left a hidden staging folder (39 MB for cp_tinyvit_fast) in the export
    cache that no later run removed. It is named by the exporting process's pid now; the next export removes those
    of processes that are gone."""
    import os
    import signal
    import time

    from zoo.data.io import TEMP_PREFIX

    cache = tmp_path / "exported"
    pid = os.fork()
    if pid == 0:  # an export that is killed midway: its build never returns (no torch is run in this child)
        def stuck(folder):
            (folder / "encoder.onnx").write_bytes(b"\0" * 100_000)
            time.sleep(600)

        try:
            write_variant(cache / "first", model, stuck, "onnxruntime", "fp32", {})
        finally:
            os._exit(1)
    deadline = time.time() + 60
    while not list(cache.glob(f"{TEMP_PREFIX}{pid}.first.*/encoder.onnx")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    (left,) = cache.glob(f"{TEMP_PREFIX}{pid}.first.*")  # what the kill left
    live = cache / f"{TEMP_PREFIX}{os.getppid()}.other.abc"  # another running export's: kept
    live.mkdir()
    export_variant(model, {}, cache / "second", "onnxruntime")  # the rerun
    assert not left.exists() and live.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(["second", live.name])


def test_index_add_ships_an_exported_folder(model, tmp_path, monkeypatch):
    empty_zoo(tmp_path, monkeypatch)
    out = export_variant(model, {}, tmp_path / "v", "onnxruntime")
    assert zoo.index.main(["add", "tiny_ort", str(out)]) == 0
    (entry,) = zoo.index.read_index()
    assert entry["file"] == "tiny_ort/manifest.json" and entry["backend"] == "onnxruntime"
    assert entry["params_M"] == pytest.approx(model_size(model)["params"] / 1e6, abs=1e-3)
    assert isinstance(zoo.index.load("tiny_ort"), ExportedModel)
    assert zoo.index.model_bytes("tiny_ort") > (out / "encoder.onnx").stat().st_size


def test_a_derived_entry_is_exported_once_on_first_load_and_follows_its_parent(model, tmp_path, monkeypatch, capsys):
    index = empty_zoo(tmp_path, monkeypatch)
    source = save_checkpoint(tmp_path / "best.pt", model)
    assert zoo.index.main(["add", "tiny", str(source)]) == 0
    assert zoo.index.main(["add", "tiny_ov", "tiny", "--export", "openvino"]) == 0
    entry = zoo.index.read_index()[1]
    assert entry["file"] is None and entry["derived_from"] == "tiny" and entry["backend"] == "openvino"
    assert entry["params_M"] == pytest.approx(model_size(model)["params"] / 1e6, abs=1e-3)
    assert not list(index.parent.glob("tiny_ov*"))  # nothing committed beside the parent checkpoint
    (folder,) = (tmp_path / "cache").iterdir()
    assert zoo.index.model_file("tiny_ov") == folder / "manifest.json"

    monkeypatch.setattr(zoo.index, "export_variant", lambda *a, **k: pytest.fail("exported twice"))
    exported = zoo.index.load("tiny_ov")  # `add` exported it (to measure it): now it comes from the cache
    image = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.allclose(zoo.index.load("tiny_ov").embed(image), model.embed(image), atol=1e-4)
    assert exported.backend == "openvino"
    assert exported.manifest["metadata"]["parent_sha256"] == zoo.index.read_index()[0]["sha256"]

    monkeypatch.undo()  # the real exporter again, for the damaged export below
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", index.parent)
    monkeypatch.setattr(zoo.index, "EXPORT_CACHE", tmp_path / "cache")
    capsys.readouterr()
    weights = bytearray((folder / "encoder.bin").read_bytes())  # bytes flipped in place, the size unchanged
    weights[len(weights) // 2 : len(weights) // 2 + 64] = bytes(b ^ 0xFF for b in weights[len(weights) // 2 : len(weights) // 2 + 64])
    (folder / "encoder.bin").write_bytes(bytes(weights))
    with torch.inference_mode():  # discarded, exported again, and answering like a clean export
        assert torch.allclose(zoo.index.load("tiny_ov").embed(image), model.embed(image), atol=1e-4)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"{folder / 'encoder.bin'}: sha256 does not match" in warnings[0]
    zoo.index.load("tiny_ov")
    assert "warning" not in capsys.readouterr().err  # the new export is clean
    (index.parent / "tiny.pt").write_bytes(b"changed")  # a changed parent is refused, not exported
    with pytest.raises(CheckpointError, match="does not match the zoo index"):
        zoo.index.load("tiny_ov")
    for not_a_checkpoint in ("nonexistent", "tiny_ov"):  # an export is made from a committed .pt, not from an export
        assert zoo.index.main(["add", "bad", not_a_checkpoint, "--export", "onnxruntime"]) == 2
        assert "needs the name of a committed zoo checkpoint" in capsys.readouterr().err


def test_a_bf16_variant_is_offered_where_the_cpu_computes_bf16_and_refused_elsewhere(model, tmp_path, monkeypatch, capsys):
    import compress.export  # the export CLI (zoo.runtime.export's command)
    import zoo.runtime.cpu

    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    assert compress.export.main([str(checkpoint), "--backend", "onnxruntime", "--precision", "bf16", "--out", str(tmp_path / "o")]) == 2
    assert "onnxruntime computes in fp32, int8, not bf16" in capsys.readouterr().err
    if zoo.runtime.cpu.openvino_supports_bf16():
        assert compress.export.main([str(checkpoint), "--precision", "bf16", "--out", str(tmp_path / "b")]) == 0
        variant = zoo.index.load(tmp_path / "b")
        assert variant.precision == "bf16" and variant.graphs["encoder"].inference_precision == "bf16"
        fp32 = export_variant(model, {}, tmp_path / "f", "openvino")
        assert variant.encoder_fingerprint() != zoo.index.load(fp32).encoder_fingerprint()
        image = torch.rand(1, 3, 256, 256)
        with torch.inference_mode():
            reference = model.embed(image)
            assert 0 < ((variant.embed(image) - reference).norm() / reference.norm()).item() < 0.05
    monkeypatch.setattr(zoo.runtime.cpu, "openvino_supports_bf16", lambda: False)  # as on a CPU without AVX512_BF16 / AMX
    assert compress.export.main([str(checkpoint), "--precision", "bf16", "--out", str(tmp_path / "n")]) == 2
    assert "has no BF16 support in OpenVINO" in capsys.readouterr().err
    assert not (tmp_path / "n").exists() and not (tmp_path / "o").exists()


def test_a_derived_bf16_entry_is_listed_once_and_left_out_of_default_runs_on_cpus_without_bf16(model, tmp_path, monkeypatch, capsys):
    import zoo.runtime.cpu

    empty_zoo(tmp_path, monkeypatch)
    assert zoo.index.main(["add", "tiny", str(save_checkpoint(tmp_path / "best.pt", model))]) == 0
    assert zoo.index.main(["add", "tiny_ort", "tiny", "--export", "onnxruntime", "--precision", "bf16"]) == 2
    assert "onnxruntime computes in fp32, int8, not bf16" in capsys.readouterr().err
    if zoo.runtime.cpu.openvino_supports_bf16():
        assert zoo.index.main(["add", "tiny_ov", "tiny", "--export", "openvino"]) == 0
        assert zoo.index.main(["add", "tiny_bf16", "tiny", "--export", "openvino", "--precision", "bf16"]) == 0
        entry = zoo.index.read_index()[2]
        assert entry["precision"] == "bf16" and entry["file"] is None and "BF16" in entry["source"]
        variant = zoo.index.load("tiny_bf16")
        assert {g.inference_precision for g in variant.graphs.values()} == {"bf16"}
        assert zoo.index.model_file("tiny_bf16") != zoo.index.model_file("tiny_ov")  # its own export
        assert zoo.index.not_on_this_cpu("tiny_bf16") is None
    else:
        # listed on a CPU that cannot run it (as committed from one that can): not measured here, named
        assert zoo.index.main(["add", "tiny_bf16", "tiny", "--export", "openvino", "--precision", "bf16"]) == 0
        assert "not measured here: tiny_bf16" in capsys.readouterr().err
    monkeypatch.setattr(zoo.runtime.cpu, "openvino_supports_bf16", lambda: False)
    assert "no BF16 support in OpenVINO" in zoo.index.not_on_this_cpu("tiny_bf16")
    assert zoo.index.not_on_this_cpu("tiny") is None and zoo.index.not_on_this_cpu("not a zoo name") is None


@pytest.mark.parametrize("from_parent", ["decoder", ["encoder"], ["heads"], [["decoder"]]])
def test_a_manifest_naming_odd_parts_from_its_parent_is_refused(model, tmp_path, from_parent):
    import shutil

    from zoo.runtime.exported import MANIFEST, read_manifest

    out = export_variant(model, {"parent": "tiny"}, tmp_path / "v", "onnxruntime", "fp32")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "from_parent": from_parent}))
    with pytest.raises(CheckpointError, match="'from_parent' must list parts"):
        read_manifest(broken)
    manifest["files"].pop("decoder")
    (broken / MANIFEST).write_text(json.dumps({**manifest, "from_parent": ["decoder"]}))
    assert read_manifest(broken)["from_parent"] == ["decoder"]  # a partial variant reads; it loads by zoo name only
    with pytest.raises(CheckpointError, match="load it by its zoo name"):
        ExportedModel(broken)


@pytest.fixture(scope="module")
def click_prompts(model):
    """(embedding, boxes, [(click inputs, PyTorch's logits)], box-only logits): seeded, and decoded by PyTorch once
    for both backends (the tiny model's decoder is the slow part of a comparison)."""
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    boxes = torch.tensor([[10.0, 10.0, 100.0, 100.0], [50.0, 60.0, 200.0, 220.0]])
    prompts = []
    with torch.inference_mode():
        for count in (0, 1, MAX_POINTS, MAX_POINTS + 1):  # padded, full, and more than the graph takes
            points = torch.rand(2, count, 2, generator=generator) * 255
            labels = (torch.arange(2 * count).reshape(2, count) % 2).float()
            for mask in (None, torch.randn(2, 1, 256, 256, generator=generator) * 10):
                if count == 0 and mask is None:
                    continue
                inputs = {"points": points if count else None, "point_labels": labels if count else None,
                          "mask_input": mask}
                prompts.append((inputs, model.decode(embedding, boxes, 3, **inputs)))
        return embedding, boxes, prompts, model.decode(embedding, boxes, 3)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_exported_click_decoder_answers_like_pytorch_and_boxes_alone_keep_their_graph(exported, click_prompts,
                                                                                          backend):
    """The clicks graph (fixed MAX_POINTS points, padded as SAM's ONNX export pads them, and a mask prompt) against
    PyTorch, which pads the same way: FP32 to 1e-3 of the logits, from no click (a mask alone) to one, all the graph
    takes and more (the latest MAX_POINTS), with and without a mask."""
    variant = ExportedModel(exported(backend))
    assert variant.takes_clicks and set(variant.graphs) == {"encoder", "decoder", "head", "clicks"}
    assert not variant.clicks_trained  # as its parent: no click stage trained it (zoo.segment and the app warn)
    embedding, boxes, prompts, box_only = click_prompts
    calls = []
    for part in ("decoder", "clicks"):
        graph = variant.graphs[part]
        variant.graphs[part] = lambda graph=graph, part=part, **inputs: calls.append(part) or graph(**inputs)
    with torch.inference_mode():
        for inputs, theirs in prompts:
            ours = variant.decode(embedding, boxes, 3, **inputs)
            clicks = 0 if inputs["points"] is None else inputs["points"].shape[1]
            assert torch.allclose(ours, theirs, atol=1e-3), (clicks, inputs["mask_input"] is None,
                                                             (ours - theirs).abs().max())
        assert set(calls) == {"clicks"}
        calls.clear()
        assert torch.allclose(variant.decode(embedding, boxes, 3), box_only, atol=1e-3)
        assert calls == ["decoder"]  # a box alone runs the box-only graph, as before clicks existed


def test_a_click_trained_parent_makes_a_click_trained_variant(tmp_path):
    """The click stage's marker (ModelConfig.clicks_trained) goes into every variant's manifest, so that an exported
    form warns as its parent does."""
    from dataclasses import replace

    from zoo.runtime.exported import MANIFEST

    trained = tiny_model()
    trained.config = replace(trained.config, clicks_trained=True)

    def one_graph(folder):
        (folder / "encoder.onnx").write_bytes(b"graph")
        return {"encoder": folder / "encoder.onnx"}

    out = write_variant(tmp_path / "v", trained, one_graph, "onnxruntime", "fp32", {})
    assert json.loads((out / MANIFEST).read_text())["clicks_trained"] is True


def test_a_variant_without_a_click_graph_says_so_and_still_decodes_boxes(model, exported, tmp_path):
    import shutil

    from zoo.runtime.exported import MANIFEST, NoClicksError

    older = tmp_path / "older"  # as exported before issue #31
    shutil.copytree(exported("onnxruntime"), older)
    manifest = json.loads((older / MANIFEST).read_text())
    manifest["files"].pop("clicks")
    (older / MANIFEST).write_text(json.dumps(manifest))
    (older / "clicks.onnx").unlink()
    variant = ExportedModel(older)
    embedding, boxes = torch.randn(1, 256, 64, 64), torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    assert not variant.takes_clicks
    with torch.inference_mode():
        assert torch.allclose(variant.decode(embedding, boxes, 1), model.decode(embedding, boxes, 1), atol=1e-3)
        with pytest.raises(NoClicksError, match="older: this variant takes no clicks"):
            variant.decode(embedding, boxes, 1, points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1))
