"""The graph export a derived zoo variant needs: a model's parts to ONNX (torch.onnx) and OpenVINO IR, written as
an exported variant folder with its sha256 manifest that zoo.runtime.exported reads.

zoo.index exports a derived entry on its first load with this module; `python -m compress.export` is its command.
Graph inputs and outputs are listed in zoo.runtime.exported.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from zoo.data.io import clean_stale_temps, temp_name
from zoo.data.preprocess import IMAGE_SIZE
from zoo.models.class_prompt import EMBED_DIM, ClassPromptSAM
from zoo.models.clicks import pad_clicks
from zoo.models.flops import model_size
from zoo.models.weights import sha256_file
from zoo.runtime.backends import BACKENDS, EXPORT_PRECISIONS, check_precision, export_backend
from zoo.runtime.exported import CLICK_INPUTS, FORMAT, MANIFEST, PARTS, read_manifest

OPSET = 17
# Named in the cache folder of every export made on first load (zoo.index): a cached export made before its graphs
# changed is not reused; the first load exports anew. clicks1: the `clicks` graph (issue #31); masks2: the light
# decoder's upscaling on the tokens (zoo.models.pooled_decoder.upscaled_masks: the same masks, faster).
EXPORT_PARTS_VERSION = "masks2"


class EncoderGraph(nn.Module):
    """image (1, 3, 256, 256) -> embedding (1, 256, 64, 64)."""

    def __init__(self, model: ClassPromptSAM):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed(image)


class HeadGraph(nn.Module):
    """embedding (1, 256, 64, 64) -> modality logits (1, 11)."""

    def __init__(self, model: ClassPromptSAM):
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.model.predict_modality(embedding)


class DecoderGraph(nn.Module):
    """decode() with the modality as an input (class-prompt models) or without one."""

    def __init__(self, model: ClassPromptSAM):
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.decode(embedding, boxes, modality)


class ClickDecoderGraph(nn.Module):
    """decode_clicks(): a box with clicks padded to MAX_POINTS and the previous step's logits (zoo.models.clicks)."""

    def __init__(self, model: ClassPromptSAM):
        super().__init__()
        self.model = model

    def forward(self, embedding, boxes, *inputs):
        modality, (points, point_labels, mask_input, has_mask_input) = (inputs[0], inputs[1:]) if len(inputs) == 5 \
            else (None, inputs)
        return self.model.decode_clicks(embedding, boxes, modality, points, point_labels, mask_input, has_mask_input)


def click_example(count: int) -> tuple[torch.Tensor, ...]:
    """Example click inputs for `count` boxes (tracing): a positive and a negative click, a previous mask."""
    clicks = pad_clicks(count, torch.tensor([[60.0, 80.0], [100.0, 90.0]]), torch.tensor([1.0, 0.0]),
                        torch.randn(count, 1, IMAGE_SIZE, IMAGE_SIZE))
    return tuple(clicks.values())


def export_onnx(model: ClassPromptSAM, folder: Path, parts: tuple[str, ...] = PARTS) -> dict[str, Path]:
    """encoder.onnx, decoder.onnx (a dynamic number of boxes), clicks.onnx (the decoder with clicks and a mask
    prompt, zoo.models.clicks) and, with a modality head, head.onnx; only those in `parts`. A copy is traced:
    tracing leaves state behind in timm's attention-bias caches."""
    model = copy.deepcopy(model).float().eval()
    grid = model.config.encoder.embedding_size
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    embedding = torch.randn(1, EMBED_DIM, grid, grid)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0], [30.0, 30.0, 90.0, 200.0]])
    paths = {"encoder": folder / "encoder.onnx", "decoder": folder / "decoder.onnx", "clicks": folder / "clicks.onnx"}
    exports = [(EncoderGraph(model), (image,), ["image"], ["embedding"], {}, paths["encoder"])]
    decoder_inputs, decoder_names = (embedding, boxes), ["embedding", "boxes"]
    dynamic = {"boxes": {0: "boxes"}, "logits": {0: "boxes"}}
    if model.has_modality_head:
        decoder_inputs += (torch.tensor([3, 3]),)
        decoder_names.append("modality")
        dynamic["modality"] = {0: "boxes"}
        paths["head"] = folder / "head.onnx"
        exports.append((HeadGraph(model), (embedding,), ["embedding"], ["modality_logits"], {}, paths["head"]))
    exports.append((DecoderGraph(model), decoder_inputs, decoder_names, ["logits"], dynamic, paths["decoder"]))
    click_names = decoder_names + CLICK_INPUTS
    click_dynamic = {**dynamic, **{name: {0: "boxes"} for name in CLICK_INPUTS if name != "has_mask_input"}}
    exports.append((ClickDecoderGraph(model), decoder_inputs + click_example(len(boxes)), click_names, ["logits"],
                    click_dynamic, paths["clicks"]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic that is constant here
        for module, inputs, in_names, out_names, axes, path in exports:
            if path.stem not in parts:
                continue
            torch.onnx.export(module, inputs, str(path), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes or None, opset_version=OPSET, dynamo=False)
    return {part: path for part, path in paths.items() if part in parts}


def onnx_to_openvino(onnx_path: Path, xml_path: Path, compress_to_fp16: bool = False) -> Path:
    import openvino

    openvino.save_model(openvino.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=compress_to_fp16)
    return xml_path


def graph_files(path: Path) -> list[Path]:
    """The files a graph consists of: model.onnx, or model.xml + model.bin."""
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


def write_variant(out: Path, model: ClassPromptSAM, build, backend: str, precision: str, metadata: dict) -> Path:
    """Build a variant of `model` in a temporary folder beside `out` with build(folder) -> {part: graph path},
    write its manifest (with the model's size), then rename it to `out`. A failure leaves nothing at `out`; an
    existing `out` is not touched. The staging folder is named by this process's pid (zoo.data.io.temp_name): one
    that a killed export left (tens of MB) is removed here by the next export into the same folder, while a
    running export's is kept."""
    if out.exists():
        raise FileExistsError(f"{out}: exists already; choose another --out (nothing is overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)
    staging = Path(tempfile.mkdtemp(prefix=temp_name(out.name), dir=out.parent))
    try:
        parts = build(staging)
        files = {part: {"path": path.name, "sha256": {f.name: sha256_file(f) for f in graph_files(path)}} for part, path in parts.items()}
        for leftover in set(staging.iterdir()) - {staging / n for e in files.values() for n in e["sha256"]}:
            leftover.unlink()  # intermediate graphs (an ONNX file behind an OpenVINO IR)
        manifest = {"format": FORMAT, "backend": backend, "precision": precision, "class_prompt": model.has_modality_head,
                    "clicks_trained": model.clicks_trained, "size": model_size(model), "files": files, "metadata": metadata}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o755)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_variant(model: ClassPromptSAM, metadata: dict, out: Path, backend: str, precision: str = "fp32") -> Path:
    """A float variant of `model` on `backend`: fp32, or (OpenVINO on a CPU with BF16) computed in bf16."""
    export_backend(backend)
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; an export is one of {', '.join(EXPORT_PRECISIONS)}")
    check_precision(backend, precision)

    def build(folder: Path) -> dict[str, Path]:
        paths = export_onnx(model, folder)
        if backend == "openvino":
            paths = {part: onnx_to_openvino(p, p.with_suffix(".xml")) for part, p in paths.items()}
        return paths

    return write_variant(out, model, build, backend, precision, metadata)


def complete_variant(shipped: Path, model: ClassPromptSAM, out: Path) -> Path:
    """A zoo variant that ships only some parts (manifest `from_parent`, e.g. an INT8 encoder without the FP32
    decoder and head of its parent) made whole at `out`: its checked files copied, the parts it takes from its
    parent `model` exported to the runtime its graphs run on (OpenVINO, else ONNX Runtime)."""
    manifest = read_manifest(shipped)
    runtime = BACKENDS[manifest["backend"]].graph_runtime

    def build(folder: Path) -> dict[str, Path]:
        paths = export_onnx(model, folder, tuple(manifest["from_parent"]))
        if runtime == "openvino":
            paths = {part: onnx_to_openvino(p, p.with_suffix(".xml")) for part, p in paths.items()}
        for part, entry in manifest["files"].items():
            for name in entry["sha256"]:
                shutil.copyfile(shipped / name, folder / name)
            paths[part] = folder / entry["path"]
        return paths

    metadata = {**manifest["metadata"], "shipped_parts": sorted(manifest["files"]), "from_parent": manifest["from_parent"]}
    return write_variant(out, model, build, manifest["backend"], manifest["precision"], metadata)
