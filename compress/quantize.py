"""Static INT8 post-training quantization of a zoo model's encoder, calibrated on real images.

    python -m compress.quantize zoo/cp_tinyvit.pt [--backend openvino|onnxruntime] [--calib DIR ...] [--n-calib 64]
                                [--keep-fp32 REGEX ...] [--out DIR]

The encoder is exported to ONNX and quantized with activation ranges measured on --n-calib real images (2D
images and 3D slices, drawn evenly across modalities with a seed, preprocessed exactly as at inference): NNCF for
OpenVINO, onnxruntime.quantization (QDQ, per-channel weights) for ONNX Runtime. Dynamic (uncalibrated) INT8 is
not offered: on LiteMedSAM's encoder it was slower than FP32 and far off. The decoder and the modality head stay
FP32. Layers whose names match a --keep-fp32 regular expression are left unquantized.

The result is a variant folder (zoo.exported) that zoo.load, zoo.predict and benchmarks.run take like any model;
`python -m zoo.index add NAME FOLDER` ships it. The input model is only read.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from compress.export import load_parent
from distill.data import DataError, find_samples, sample_tensor
from zoo.class_prompt import ClassPromptSAM
from zoo.cli import RUNS_DIR, run_cli
from zoo.export import export_onnx, onnx_to_openvino, write_variant
from zoo.exported import BACKENDS, check_backend
from zoo.io import SHARED_DATA, refuse_overwriting_inputs


def calibration_images(data_dirs: list[Path], count: int, seed: int = 0, skipped: list[str] | None = None) -> list[np.ndarray]:
    """`count` preprocessed images (1, 3, 256, 256) float32, taken round-robin over modalities in a seeded order
    (unusable files reported and left out when a `skipped` list is given, see distill.data.find_samples)."""
    samples = find_samples(data_dirs, slice_step=5, seed=seed, skipped=skipped)
    by_modality = defaultdict(list)
    for sample in samples:
        by_modality[sample.modality].append(sample)
    rng = random.Random(seed)
    for group in by_modality.values():
        rng.shuffle(group)
    chosen = []
    while len(chosen) < count and any(by_modality.values()):
        for modality in sorted(by_modality):
            if by_modality[modality] and len(chosen) < count:
                chosen.append(by_modality[modality].pop())
    images = [sample_tensor(s)[None].numpy() for s in chosen]
    usable = [image for image in images if image.max() > image.min()]  # a constant slice says nothing about ranges
    if not usable:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no usable calibration images (all constant)")
    return usable


def quantize_openvino(onnx_path: Path, xml_path: Path, images: list[np.ndarray], keep_fp32: list[str]) -> Path:
    import nncf
    import openvino

    model = openvino.convert_model(str(onnx_path))
    ignored = nncf.IgnoredScope(patterns=keep_fp32, validate=False) if keep_fp32 else None
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images), ignored_scope=ignored,
                              target_device=nncf.TargetDevice.CPU)
    openvino.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return xml_path


def quantize_onnxruntime(onnx_path: Path, out_path: Path, images: list[np.ndarray], keep_fp32: list[str]) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(images)

        def get_next(self):
            image = next(self.items, None)
            return None if image is None else {"image": image}

    prepared = out_path.with_name(out_path.stem + ".prepared.onnx")
    quant_pre_process(str(onnx_path), str(prepared))
    names = [node.name for node in onnx.load(str(prepared)).graph.node]
    excluded = [n for n in names if any(re.search(p, n) for p in keep_fp32)]
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return out_path


def quantize_variant(model: ClassPromptSAM, out: Path, backend: str, images: list[np.ndarray], keep_fp32: list[str],
                     metadata: dict) -> Path:
    check_backend(backend)
    for pattern in keep_fp32:
        try:
            re.compile(pattern)  # a bad expression fails here, before any work
        except re.error as err:
            raise ValueError(f"--keep-fp32 {pattern!r} is not a regular expression ({err})") from err

    def build(folder: Path) -> dict[str, Path]:
        paths = export_onnx(model, folder)
        if backend == "openvino":
            encoder = quantize_openvino(paths["encoder"], folder / "encoder_int8.xml", images, keep_fp32)
            paths = {part: onnx_to_openvino(p, p.with_suffix(".xml")) for part, p in paths.items() if part != "encoder"}
        else:
            encoder = quantize_onnxruntime(paths["encoder"], folder / "encoder_int8.onnx", images, keep_fp32)
            paths = {part: p for part, p in paths.items() if part != "encoder"}
        return {"encoder": encoder, **paths}

    return write_variant(out, model, build, backend, "int8",
                         {**metadata, "calibration_images": len(images), "keep_fp32": keep_fp32})


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m compress.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="zoo name or checkpoint path")
    parser.add_argument("--backend", choices=BACKENDS, default="openvino")
    parser.add_argument("--calib", type=Path, nargs="+", default=[SHARED_DATA / "train"],
                        help="challenge npz directories with calibration images (default: the train split)")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--keep-fp32", nargs="*", default=[], metavar="REGEX", help="layer names left in FP32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="variant folder (default runs/compress/<model>_<backend>_int8)")
    args = parser.parse_args(argv)
    if args.n_calib < 1:
        parser.error("--n-calib must be at least 1")
    return args


def run(args) -> Path:
    out = args.out or RUNS_DIR / "compress" / f"{Path(args.model).stem}_{args.backend}_int8"
    refuse_overwriting_inputs(out, [*args.calib, *([Path(args.model)] if Path(args.model).exists() else [])], "--out")
    model, metadata = load_parent(args.model)
    images = calibration_images(args.calib, args.n_calib, args.seed, skipped=getattr(args, "skipped", None))
    metadata.update(calibration_data=[str(d) for d in args.calib], seed=args.seed)
    quantize_variant(model, out, args.backend, images, args.keep_fp32, metadata)
    print(f"wrote {out}: {args.backend} INT8 encoder calibrated on {len(images)} images, FP32 decoder")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
