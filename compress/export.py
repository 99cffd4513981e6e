"""Export a zoo model to ONNX Runtime or OpenVINO (FP32) as a variant folder that zoo.load reads; the graph
export itself is zoo.runtime.export's (a derived zoo entry uses it on first load).

    python -m compress.export zoo/cp_tinyvit.pt --backend openvino --out runs/compress/cp_tinyvit_openvino_fp32
    python -m compress.export zoo/cp_tinyvit.pt --backend openvino --precision bf16    # CPUs with AVX512_BF16 / AMX

A bf16 variant is the fp32 graph that OpenVINO is told to compute in bf16 (zoo.runtime.backends.OPENVINO_PRECISION); it is
refused on a CPU where OpenVINO cannot (it would run f32 and be labelled bf16).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zoo.cli import RUNS_DIR, run_cli
from zoo.data.io import refuse_overwriting_inputs
from zoo.index import load, parent_record
from zoo.models.class_prompt import ClassPromptSAM
from zoo.runtime.backends import EXPORT_BACKENDS, EXPORT_PRECISIONS, check_precision
from zoo.runtime.export import export_variant


def load_parent(name: str) -> tuple[ClassPromptSAM, dict]:
    """The PyTorch model to export, quantize or prune (a zoo name or checkpoint path) and the metadata naming it."""
    model = load(name)
    if not isinstance(model, ClassPromptSAM):
        raise ValueError(f"{name}: export and quantization need a PyTorch model, not an exported one")
    return model, parent_record(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m compress.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="zoo name or checkpoint path")
    parser.add_argument("--backend", choices=EXPORT_BACKENDS, default="openvino")
    parser.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                        help="what the float graphs compute in (bf16: openvino on CPUs with AVX512_BF16 / AMX)")
    parser.add_argument("--out", type=Path, default=None, help="variant folder (default runs/compress/<model>_<backend>_<precision>)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    check_precision(args.backend, args.precision)  # before the parent is loaded
    out = args.out or RUNS_DIR / "compress" / f"{Path(args.model).stem}_{args.backend}_{args.precision}"
    refuse_overwriting_inputs(out, [Path(args.model)] if Path(args.model).exists() else [], "--out")
    export_variant(*load_parent(args.model), out=out, backend=args.backend, precision=args.precision)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
