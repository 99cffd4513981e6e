"""The backend table: which runtimes a model variant can run on, what each computes in, and the one rule for bf16.

A bf16 variant is the fp32 graph that OpenVINO is told to compute in bf16. OpenVINO's CPU plugin does so only on CPUs
with AVX512_BF16 or AMX; elsewhere it would run f32 and the variant's label would be false, so it is refused there.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Backend:
    name: str
    package: str  # the package whose version its results depend on
    graph_runtime: str | None  # what runs a variant's float graphs (decoder, head); None: no graphs
    exportable: bool  # compress.export and derived zoo entries export to it
    precisions: tuple[str, ...]  # what a variant on it may compute in


BACKENDS = {
    "pytorch": Backend("pytorch", "torch", None, False, ("fp32",)),
    "onnxruntime": Backend("onnxruntime", "onnxruntime", "onnxruntime", True, ("fp32", "int8")),
    "openvino": Backend("openvino", "openvino", "openvino", True, ("fp32", "bf16", "int8")),
    # Intel Neural Compressor's PT2E INT8 encoder, a torch.export program; its decoder and head run on ONNX Runtime
    "inc": Backend("inc", "torch", "onnxruntime", False, ("int8",)),
}
EXPORT_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.exportable)  # compress.export's choices
MANIFEST_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.graph_runtime)  # what a variant folder may name
EXPORT_PRECISIONS = ("fp32", "bf16")  # what an export (not a quantization) computes in
# What OpenVINO computes a variant's float parts in. Its CPU plugin defaults to bf16 on CPUs with AVX512_BF16 or AMX,
# so without an explicit hint an "fp32" variant silently runs in bf16 there; an int8 variant's float layers stay f32.
OPENVINO_PRECISION = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}


def backend(name: str) -> Backend:
    """The backend of that name; ValueError naming the choices otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


@lru_cache(maxsize=1)
def openvino_core():
    """The process's one openvino.Core, kept until exit; every OpenVINO graph the toolkit compiles goes through it.
    Each Core's CPU plugin gives the thread a signal stack of its own (for AMX's large signal frames) and, when the
    Core goes, puts back the one it found and unmaps its own. Cores that went in another order than they came (two
    models, the first dropped first) left the main thread on an unmapped stack, and the next Ctrl-C was a
    segmentation fault instead of exit 130 (the CI run of stop 35). One Core that outlives the rest keeps it valid."""
    import openvino

    return openvino.Core()


def runtime_version(name: str) -> str:
    """The installed version of the package a backend's results depend on."""
    return importlib.metadata.version(backend(name).package)


def export_backend(name: str) -> Backend:
    """A backend compress.export can export to; ValueError naming them otherwise."""
    if name not in EXPORT_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(EXPORT_BACKENDS)}")
    return BACKENDS[name]


def precision_problem(backend_name: str, precision: str, on_this_cpu: bool = True) -> str | None:
    """Why `backend_name` cannot compute in `precision` (on this CPU, unless on_this_cpu is False); None where it
    can. The one bf16 rule."""
    known = backend(backend_name).precisions
    if precision not in known:
        return f"{backend_name} computes in {', '.join(known)}, not {precision}"
    if precision == "bf16" and on_this_cpu:
        from zoo.runtime.cpu import cpu_model, openvino_supports_bf16

        if not openvino_supports_bf16():
            return f"a bf16 variant; this CPU ({cpu_model()}) has no BF16 support in OpenVINO (AVX512_BF16 or AMX)"
    return None


def check_precision(backend_name: str, precision: str) -> None:
    """ValueError, before any work, where `backend_name` cannot compute in `precision` here."""
    problem = precision_problem(backend_name, precision)
    if problem:
        raise ValueError(f"--precision {precision}: {problem}")
