"""Exported model variants (ONNX Runtime, OpenVINO) behind the same interface as ClassPromptSAM.

A variant is a folder: manifest.json plus one graph per part — `encoder` (image -> embedding), `decoder`
(embedding, boxes[, modality] -> mask logits), `clicks` (the decoder with clicks and a mask prompt, issue #31) and,
for class-prompt models, `head` (embedding -> modality logits). `clicks` is optional: a variant exported before it
existed loads and decodes boxes, and refuses clicks with NoClicksError naming itself (never a box-only answer).
The manifest records each file's sha256, checked before a graph is read. zoo.runtime.export (and compress.quantize) write these folders.
A zoo variant may ship only its own parts (an INT8 encoder) and name the rest `from_parent`: those are its parent's FP32
graphs, exported on first load (zoo.runtime.export.complete_variant); such a folder loads by its zoo name, not by path.
A part's runtime follows its file: `.onnx` ONNX Runtime, `.xml` (+ `.bin`) OpenVINO, `.pt2` a torch.export program
(backend 'inc': Intel Neural Compressor's PT2E INT8 encoder, with ONNX Runtime decoder and head).

Graph inputs and outputs (N boxes):
  encoder  image (1, 3, 256, 256) float32                       -> embedding (1, 256, 64, 64)
  decoder  embedding (1, 256, 64, 64), boxes (N, 4) float32,
           modality (N,) int64 (class-prompt models only)         -> logits (N, 1, 256, 256)
  clicks   the decoder's inputs, and points (N, P, 2) float32 (x, y at 256 scale),
           point_labels (N, P) float32 (1 / 0 / -1 padding), mask_input (N, 1, 256, 256)
           float32, has_mask_input (1,) float32; P = zoo.models.clicks.MAX_POINTS   -> logits (N, 1, 256, 256)
  head     embedding (1, 256, 64, 64)                            -> modality_logits (1, 11)
A box-only decode runs `decoder` (the graph it always ran); a decode with clicks or a mask runs `clicks`, its inputs
padded by zoo.models.clicks.pad_clicks as PyTorch pads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from zoo.models.clicks import pad_clicks
from zoo.models.weights import CheckpointError, sha256_file
from zoo.runtime.backends import MANIFEST_BACKENDS, OPENVINO_PRECISION, openvino_core, precision_problem

FORMAT = "cp-tinyvit-exported/1"
MANIFEST = "manifest.json"
PARTS = ("encoder", "decoder", "head", "clicks")
CLICK_INPUTS = ["points", "point_labels", "mask_input", "has_mask_input"]


class NoClicksError(ValueError):
    """A decode with clicks asked of a variant whose folder has no click decoder."""


def read_manifest(folder: Path) -> dict:
    """The manifest of an exported variant, with every listed file present and matching its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an exported model (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cp-tinyvit exported-model manifest (expected format {FORMAT!r})")
    if manifest.get("backend") not in MANIFEST_BACKENDS:
        raise CheckpointError(f"{path}: unknown backend {manifest.get('backend')!r}; expected one of {', '.join(MANIFEST_BACKENDS)}")
    files = manifest.get("files", {})
    if not isinstance(manifest.get("size"), dict) or not isinstance(files, dict):
        raise CheckpointError(f"{path}: the manifest has no size or no files")
    from_parent = manifest.setdefault("from_parent", [])
    if not isinstance(from_parent, list) or not all(isinstance(p, str) for p in from_parent) \
            or not set(from_parent) <= set(PARTS) - set(files):
        raise CheckpointError(f"{path}: 'from_parent' must list parts ({', '.join(PARTS)}) that the folder does not ship")
    if not {"encoder", "decoder"} <= set(files) | set(from_parent):
        raise CheckpointError(f"{path}: the manifest lists no encoder or no decoder graph")
    for part, entry in files.items():
        for name, digest in entry["sha256"].items():
            file = folder / name
            if not file.is_file():
                raise CheckpointError(f"{file}: {part} graph file listed in {MANIFEST} is missing")
            if sha256_file(file) != digest:
                raise CheckpointError(f"{file}: sha256 does not match {MANIFEST}; refusing a changed or truncated file")
    return manifest


class _OnnxRuntimeGraph:
    # ONNX Runtime's CPU provider computes float graphs in f32 on every CPU.
    inference_precision = "f32"

    def __init__(self, path: Path, threads: int, precision: str):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
            raise CheckpointError(f"{path}: ONNX Runtime cannot load this graph ({err})") from err

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, inputs)[0]


class _OpenVINOGraph:
    """An OpenVINO graph. A graph with a dynamic number of boxes also runs a copy of itself compiled for one box, for
    calls whose dynamic dimensions are all 1 (every click, a slice's object): OpenVINO runs a static shape faster
    (an INT8 click 30 -> 24 ms on a 2-core VNNI Xeon, docs/interactive.md). It is compiled on the first such call
    (0.4 to 0.9 s there, once per graph)."""

    def __init__(self, path: Path, threads: int, precision: str):
        if precision not in OPENVINO_PRECISION:
            raise CheckpointError(f"{path}: unknown precision {precision!r}; expected one of {', '.join(OPENVINO_PRECISION)}")
        self.path = path
        self.config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision]}
        try:
            self.model = openvino_core().read_model(str(path))
            self.compiled = openvino_core().compile_model(self.model, "CPU", self.config)
        except Exception as err:  # openvino raises RuntimeError subclasses of its own
            raise CheckpointError(f"{path}: OpenVINO cannot load this model ({err})") from err
        if precision == "bf16" and self.inference_precision != "bf16":
            # OpenVINO would quietly run f32 on a CPU without BF16: the variant's label would be false.
            raise CheckpointError(f"{path}: {precision_problem('openvino', 'bf16') or 'OpenVINO computes it in f32'}; "
                                  "load the fp32 variant instead")
        self.request = self.compiled.create_infer_request()
        # each input's names (OpenVINO may rename an input: the given name is one of its names) and dynamic axes
        self.inputs = [(port.get_names(), [axis for axis, dim in enumerate(port.get_partial_shape()) if dim.is_dynamic])
                       for port in self.model.inputs]
        self.has_dynamic_axes = any(axes for _, axes in self.inputs)  # the encoder and the head have none
        self.one_box = None  # (compiled, request), made on the first one-box call

    @property
    def inference_precision(self) -> str:
        """What the compiled graph computes its float layers in, as OpenVINO reports it ('f32', 'bf16')."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def _one_box_request(self, inputs: dict[str, np.ndarray]):
        """The copy compiled for these inputs' shapes when the graph has dynamic axes and they are all 1, else None."""
        if not self.has_dynamic_axes:
            return None
        shapes = [next((inputs[name].shape for name in names if name in inputs), None) for names, _ in self.inputs]
        if any(shape is None or any(shape[axis] != 1 for axis in axes) for shape, (_, axes) in zip(shapes, self.inputs)):
            return None
        if self.one_box is None:
            model = self.model.clone()
            model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes)})
            try:
                compiled = openvino_core().compile_model(model, "CPU", self.config)
            except Exception as err:  # openvino raises RuntimeError subclasses of its own
                raise CheckpointError(f"{self.path}: OpenVINO cannot compile this graph for one box ({err})") from err
            self.one_box = (compiled, compiled.create_infer_request())
        return self.one_box

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        compiled, request = self._one_box_request(inputs) or (self.compiled, self.request)
        # share_inputs: the graph reads the caller's arrays instead of copying them (a 4 MB embedding per click). The
        # outputs are copies (share_outputs is False), which the request's next call does not overwrite.
        return request.infer(inputs, share_inputs=True)[compiled.output(0)]


class _TorchExportGraph:
    """A torch.export program (.pt2), run in PyTorch with its threads."""

    inference_precision = "f32"  # PyTorch's CPU kernels compute float ops in f32 unless asked otherwise

    def __init__(self, path: Path, threads: int, precision: str):
        # torch.export.load unpickles its weights and, where that fails, retries without weights_only; forcing
        # weights_only keeps a crafted file from running code (its sha256 is checked already, this guards more).
        # The quantize / dequantize ops of a PT2E INT8 program live in this torch library, which nothing else imports
        # in a process that did not quantize: without it the program's nodes do not resolve.
        import torch.ao.quantization.fx._decomposed  # noqa: F401

        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            self.module = torch.export.load(str(path)).module()
        except Exception as err:  # torch raises assorted types for an unreadable archive
            raise CheckpointError(f"{path}: not a loadable torch.export program ({err})") from err
        finally:
            if previous is None:
                del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        # A program exported with positional inputs takes them so, in the graph's input order (zoo.runtime.exported's table).
        with torch.inference_mode():
            return self.module(*(torch.from_numpy(v) for v in inputs.values())).numpy()


_GRAPHS = {".onnx": _OnnxRuntimeGraph, ".xml": _OpenVINOGraph, ".pt2": _TorchExportGraph}


def _float32(tensor: torch.Tensor) -> np.ndarray:
    """A graph input: the tensor's own memory when it is float32 already (no 4 MB copy of an embedding per decode)."""
    return np.asarray(tensor.numpy(), dtype=np.float32)


def _graph(path: Path, threads: int, precision: str):
    if path.suffix not in _GRAPHS:
        raise CheckpointError(f"{path}: unknown graph format {path.suffix!r}; expected one of {', '.join(_GRAPHS)}")
    return _GRAPHS[path.suffix](path, threads, precision)


class ExportedModel:
    """An exported variant: embed / predict_modality / decode as zoo.runtime.interface describes, on ONNX Runtime, OpenVINO
    or torch.export, with torch.get_num_threads() threads (so `--threads` applies to every backend alike)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest["from_parent"]:
            raise CheckpointError(f"{self.folder}: ships only its {', '.join(manifest['files'])} graphs; its "
                                  f"{', '.join(manifest['from_parent'])} come from its parent: load it by its zoo name")
        self.manifest = manifest
        self.backend = manifest["backend"]
        self.precision = manifest["precision"]
        self.class_prompt = bool(manifest.get("class_prompt"))
        self.clicks_trained = bool(manifest.get("clicks_trained"))  # absent in folders exported before the marker
        self.size = manifest["size"]  # the PyTorch parent's params and FLOPs (zoo.models.flops.model_size)
        threads = torch.get_num_threads()
        self.graphs = {part: _graph(self.folder / entry["path"], threads, self.precision)
                       for part, entry in manifest["files"].items()}

    @property
    def has_modality_head(self) -> bool:
        return "head" in self.graphs

    @property
    def takes_clicks(self) -> bool:
        """Whether decode takes clicks: the folder has a `clicks` graph."""
        return "clicks" in self.graphs

    def encoder_fingerprint(self) -> str:
        """Hash of the encoder graph's files (graph and weights) and of the precision it runs in: equal exactly
        when the embeddings are (one graph computed in f32 and in bf16 gives different ones)."""
        digests = sorted(self.manifest["files"]["encoder"]["sha256"].values())
        precision = self.graphs["encoder"].inference_precision
        return f"{self.backend}-" + hashlib.sha256("".join([*digests, precision]).encode()).hexdigest()

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.graphs["encoder"](image=_float32(image)))

    def predict_modality(self, embedding: torch.Tensor) -> torch.Tensor | None:
        if "head" not in self.graphs:
            return None
        return torch.from_numpy(self.graphs["head"](embedding=_float32(embedding)))

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, modality: torch.Tensor | int | None = None,
               points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"embedding": _float32(embedding), "boxes": _float32(boxes.reshape(-1, 4))}
        if self.class_prompt:
            if modality is None:
                modality = self.predict_modality(embedding).argmax(dim=1)
            ids = torch.as_tensor(modality).reshape(-1).expand(len(inputs["boxes"]))
            inputs["modality"] = ids.numpy().astype(np.int64)
        if points is None and mask_input is None:
            return torch.from_numpy(self.graphs["decoder"](**inputs))
        if "clicks" not in self.graphs:
            raise NoClicksError(f"{self.folder}: this variant takes no clicks (its folder has no click decoder graph: "
                                f"made before issue #31); decode boxes with it, or export or quantize its model again")
        clicks = pad_clicks(len(inputs["boxes"]), points, point_labels, mask_input)
        inputs.update({name: value.numpy() for name, value in clicks.items()})
        return torch.from_numpy(self.graphs["clicks"](**inputs))
