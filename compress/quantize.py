"""Static INT8 post-training quantization of a zoo model's encoder (and with --decoder its mask decoder),
calibrated on real images.

    python -m compress.quantize zoo/cp_tinyvit.pt [--backend openvino|onnxruntime|optimum|inc] [--calib DIR ...]
                                [--n-calib 64] [--keep-fp32 REGEX ...] [--model-type transformer] [--decoder]
                                [--out DIR] [--ship NAME]

The encoder is quantized with activation ranges measured on --n-calib real images (2D images and 3D slices, drawn
evenly across modalities with a seed, preprocessed exactly as at inference):
  openvino     NNCF on the OpenVINO IR (--model-type transformer: NNCF's transformer preset, SmoothQuant included)
  onnxruntime  onnxruntime.quantization, QDQ, per-channel weights
  optimum      Hugging Face Optimum's ORTQuantizer with the AutoQuantizationConfig of the running CPU (avx512_vnni,
               avx512, avx2 or arm64), static, min-max calibrated; an ONNX Runtime variant
  inc          Intel Neural Compressor 3.x (neural-compressor-pt): PT2E static INT8 (X86InductorQuantizer), saved as
               a torch.export program; PyTorch runs it, the decoder and head run on ONNX Runtime
Dynamic (uncalibrated) INT8 is not offered: on LiteMedSAM's encoder it was slower than FP32 and far off. The
modality head stays FP32, and so does the decoder unless --decoder (openvino) quantizes it too, calibrated on the
model's embeddings of images with ground truth, each with the box of one label; its masks' Dice against FP32 on
--n-check val boxes is kept in the metadata. Layers whose names match a --keep-fp32 regular expression are left
unquantized (openvino, onnxruntime, optimum: ONNX node names such as /image_encoder/neck/.*; with --decoder the
patterns apply to both graphs, whose node names start /image_encoder/ and /mask_decoder/).

The relative error of the INT8 embedding against the PyTorch model's, ||int8 - fp32|| / ||fp32|| averaged over
--n-check images of --check (default: the val split), is measured and kept in the manifest's metadata.

The result is a variant folder (zoo.runtime.exported) that zoo.load, zoo.predict and benchmarks.run take like any model;
`--ship NAME` (or `python -m zoo.index add NAME FOLDER [--quantized-only]`) commits it to the zoo as zoo/NAME/ with an
index entry that says on which CPUs INT8 is faster; when the model is a committed zoo checkpoint, only the INT8
graphs are committed and the float ones are exported from it on first load. Calibration reads licensed train
images, so a user's first load cannot calibrate: an INT8 variant ships as its files. The input model is only read.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from compress.export import load_parent
from zoo.cli import RUNS_DIR, run_cli
from zoo.data.io import data_split, refuse_overwriting_inputs
from zoo.data.samples import DataError, find_samples, round_robin, sample_area, sample_box, sample_object, sample_tensor
from zoo.interactive import next_click, padded_clicks
from zoo.modalities import prompt_modality
from zoo.models.class_prompt import ClassPromptSAM
from zoo.models.clicks import MAX_POINTS, pad_clicks
from zoo.runtime.cpu import cpu_flags
from zoo.runtime.export import EncoderGraph, export_onnx, onnx_to_openvino, write_variant
from zoo.runtime.exported import CLICK_INPUTS, _graph, read_manifest

QUANTIZERS = {"openvino": "nncf", "onnxruntime": "onnxruntime", "optimum": "optimum-onnx", "inc": "neural-compressor-pt"}
MODEL_TYPES = ("auto", "transformer")


def calibration_images(data_dirs: list[Path], count: int, seed: int = 0, skipped: list[str] | None = None) -> list[np.ndarray]:
    """`count` preprocessed images (1, 3, 256, 256) float32, taken round-robin over modalities in a seeded order
    (unusable files reported and left out when a `skipped` list is given, see zoo.data.samples.find_samples)."""
    samples = round_robin(find_samples(data_dirs, slice_step=5, seed=seed, skipped=skipped), count, seed)
    images = [sample_tensor(s)[None].numpy() for s in samples]
    usable = [image for image in images if image.max() > image.min()]  # a constant slice says nothing about ranges
    if not usable:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no usable calibration images (all constant)")
    return usable


def decoder_inputs(model: ClassPromptSAM, data_dirs: list[Path], count: int, seed: int = 0,
                   skipped: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """`count` decoder inputs as at inference, round-robin over modalities: the model's embedding of an image with
    ground truth, the 256-scale box of one of its labels and (class-prompt models) its modality."""
    samples = round_robin(find_samples(data_dirs, slice_step=5, seed=seed, foreground_only=True, skipped=skipped), count, seed)
    if not samples:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no images with ground truth to calibrate the decoder on")
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    with torch.inference_mode():
        for sample in samples:
            item = {"embedding": model.embed(sample_tensor(sample)[None]).numpy(),
                    "boxes": sample_box(sample, generator)[None].numpy()}
            if model.has_modality_head:  # the decoder graph takes the modality: the file's, else the head's guess
                chosen = prompt_modality(model, sample.modality)
                if chosen is None:
                    chosen = int(model.predict_modality(torch.from_numpy(item["embedding"])).argmax())
                item["modality"] = np.array([chosen], dtype=np.int64)
            inputs.append(item)
    return inputs


def click_inputs(model: ClassPromptSAM, data_dirs: list[Path], count: int, seed: int = 0,
                 skipped: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """`count` inputs of the clicks graph as the interactive protocol makes them, round-robin over modalities: the
    model's embedding of an image with ground truth, the box of one label, its modality, and the k-th click of a
    simulated interaction (k = 1..MAX_POINTS in turn; zoo.interactive.next_click at the 256 frame, inside the image)
    with the model's own previous logits as the mask prompt, padded as every backend pads them."""
    samples = round_robin(find_samples(data_dirs, slice_step=5, seed=seed, foreground_only=True, skipped=skipped), count, seed)
    if not samples:
        raise DataError(f"{', '.join(map(str, data_dirs))}: no images with ground truth to calibrate the decoder on")
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    with torch.inference_mode():
        for n, sample in enumerate(samples):
            embedding = model.embed(sample_tensor(sample)[None])
            box, truth = sample_object(sample, generator)
            area = sample_area(sample).numpy()
            truth = (truth[0].numpy() > 0.5) & area
            modality = prompt_modality(model, sample.modality)
            if model.has_modality_head and modality is None:
                modality = int(model.predict_modality(embedding).argmax())
            ids = None if modality is None else torch.tensor([modality])
            logits, clicks = model.decode(embedding, box[None], ids), []
            for k in range(1 + n % MAX_POINTS):
                click = next_click((logits[0, 0].numpy() > 0) & area, truth)
                if click is not None:
                    clicks.append((float(click.position[1]), float(click.position[0]), int(click.positive)))
                padded = pad_clicks(1, *padded_clicks([clicks]), logits)
                if k == n % MAX_POINTS:
                    item = {"embedding": embedding.numpy(), "boxes": box[None].numpy()}
                    if ids is not None:
                        item["modality"] = ids.numpy().astype(np.int64)
                    inputs.append({**item, **{name: value.numpy() for name, value in padded.items()}})
                else:
                    logits = model.decode_clicks(embedding, box[None], ids, *padded.values())
    return inputs


def quantize_openvino(onnx_path: Path, xml_path: Path, images: list, keep_fp32: list[str],
                      model_type: str = "auto") -> Path:
    """NNCF static INT8 of one graph; `images` are its calibration inputs (arrays, or dicts by input name)."""
    import nncf
    import openvino

    model = openvino.convert_model(str(onnx_path))
    ignored = nncf.IgnoredScope(patterns=keep_fp32, validate=False) if keep_fp32 else None
    preset = {"model_type": nncf.ModelType.TRANSFORMER} if model_type == "transformer" else {}
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images), ignored_scope=ignored,
                              target_device=nncf.TargetDevice.CPU, **preset)
    openvino.save_model(float_constants_as_fp16(quantized), str(xml_path), compress_to_fp16=False)
    return xml_path


def float_constants_as_fp16(model, min_elements: int = 1024):
    """The quantized IR with its large float32 constants (attention-bias tables, the decoder's positional grid,
    unquantized weights) stored as fp16 and converted back to f32 on load, as the zoo stores checkpoints in float16:
    the shipped files shrink by a third, the arithmetic stays f32. (save_model's compress_to_fp16 leaves NNCF's
    quantized models alone.)"""
    import openvino

    for node in model.get_ops():
        if node.get_type_name() != "Constant" or node.get_element_type() != openvino.Type.f32:
            continue
        values = node.get_data()
        if values.size < min_elements:
            continue
        half = openvino.opset13.constant(values.astype(np.float16))
        back = openvino.opset13.convert(half, openvino.Type.f32)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
    model.validate_nodes_and_infer_types()
    return model


def excluded_nodes(onnx_path: Path, keep_fp32: list[str]) -> list[str]:
    """The ONNX graph's node names that a --keep-fp32 expression matches."""
    import onnx

    return [node.name for node in onnx.load(str(onnx_path)).graph.node if any(re.search(p, node.name) for p in keep_fp32)]


def quantize_onnxruntime(onnx_path: Path, out_path: Path, images: list[np.ndarray], keep_fp32: list[str]) -> Path:
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
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded_nodes(prepared, keep_fp32))
    return out_path


def optimum_config_name(flags: tuple[str, ...]) -> str:
    """Optimum's AutoQuantizationConfig constructor for a CPU with these flags (zoo.runtime.cpu.cpu_flags)."""
    if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "arm64"


def quantize_optimum(onnx_path: Path, out_path: Path, images: list[np.ndarray], keep_fp32: list[str]) -> Path:
    """Optimum's ORTQuantizer on the encoder ONNX: static, min-max ranges from `images`, the running CPU's config."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local file only: nothing may be fetched from a model hub
    from onnxruntime.quantization import CalibrationMethod
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig, CalibrationConfig

    quantizer = ORTQuantizer.from_pretrained(onnx_path.parent, file_name=onnx_path.name)
    config = getattr(AutoQuantizationConfig, optimum_config_name(cpu_flags()))(
        is_static=True, per_channel=True, nodes_to_exclude=excluded_nodes(onnx_path, keep_fp32))
    dataset = [{"image": image[0]} for image in images]  # its reader batches each sample back to (1, 3, 256, 256)
    # AutoCalibrationConfig.minmax's settings; built directly because that helper reads a Hugging Face
    # `datasets.Dataset`'s name, and these images are no such dataset.
    calibration = CalibrationConfig(dataset_name="calibration_images", dataset_config_name="compress.quantize",
                                    dataset_split="train", dataset_num_samples=len(dataset),
                                    method=CalibrationMethod.MinMax, moving_average=False, averaging_constant=0.01)
    ranges = quantizer.fit(dataset, calibration, onnx_augmented_model_name=out_path.with_name("augmented.onnx"))
    quantizer.quantize(config, out_path.parent, file_suffix="optimum", calibration_tensors_range=ranges)
    os.rename(out_path.parent / f"{onnx_path.stem}_optimum.onnx", out_path)  # the name optimum gives it
    return out_path


def quantize_inc(model: ClassPromptSAM, out_path: Path, images: list[np.ndarray]) -> Path:
    """Intel Neural Compressor 3.x PT2E static INT8 of the encoder (its default StaticQuantConfig: X86 inductor
    quantizer, per-channel weights), calibrated on `images`, saved as a torch.export program."""
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    example = (torch.from_numpy(images[0]),)
    encoder = EncoderGraph(copy.deepcopy(model).float().eval())  # a copy: export leaves state in timm's caches
    with torch.no_grad():
        prepared = prepare(export(encoder, example_inputs=example), quant_config=StaticQuantConfig())
        for image in images:
            prepared(torch.from_numpy(image))
        quantized = convert(prepared)
        torch.export.save(torch.export.export(quantized, example), str(out_path))
    return out_path


def embedding_error(model: ClassPromptSAM, encoder_path: Path, images: list[np.ndarray], precision: str = "int8") -> float:
    """||quantized - fp32|| / ||fp32|| of the encoder embedding, averaged over `images`."""
    graph = _graph(encoder_path, torch.get_num_threads(), precision)
    errors = []
    with torch.inference_mode():
        for image in images:
            reference = model.embed(torch.from_numpy(image)).numpy()
            errors.append(float(np.linalg.norm(graph(image=image) - reference) / np.linalg.norm(reference)))
    return float(np.mean(errors))


def mask_agreement(model: ClassPromptSAM, decoder_path: Path, inputs: list[dict[str, np.ndarray]]) -> float:
    """Mean Dice of the quantized decoder's (or clicks graph's) masks against the PyTorch model's, on the same FP32
    embeddings."""
    graph = _graph(decoder_path, torch.get_num_threads(), "int8")
    dice = []
    with torch.inference_mode():
        for item in inputs:
            modality = torch.from_numpy(item["modality"]) if "modality" in item else None
            embedding, boxes = torch.from_numpy(item["embedding"]), torch.from_numpy(item["boxes"])
            if "points" in item:
                clicks = [torch.from_numpy(item[name]) for name in CLICK_INPUTS]
                reference = model.decode_clicks(embedding, boxes, modality, *clicks).numpy() > 0
            else:
                reference = model.decode(embedding, boxes, modality).numpy() > 0
            mask = graph(**item) > 0
            total = mask.sum() + reference.sum()
            dice.append(1.0 if total == 0 else 2 * float((mask & reference).sum()) / float(total))
    return float(np.mean(dice))


def quantize_variant(model: ClassPromptSAM, out: Path, backend: str, images: list[np.ndarray], keep_fp32: list[str],
                     metadata: dict, model_type: str = "auto", check_images: list[np.ndarray] | None = None,
                     decoder_calibration: list[dict] | None = None, decoder_check: list[dict] | None = None,
                     click_calibration: list[dict] | None = None, click_check: list[dict] | None = None) -> Path:
    """An INT8-encoder variant of `model` at `out` (written atomically), its embedding error on `check_images`
    in the manifest's metadata; with `decoder_calibration` (decoder_inputs, openvino) its decoder INT8 too, and its
    masks' Dice against FP32 on `decoder_check` recorded; with `click_calibration` (click_inputs) its clicks graph
    INT8 too, likewise checked on `click_check`."""
    if backend not in QUANTIZERS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(QUANTIZERS)}")
    if (decoder_calibration or click_calibration) and backend != "openvino":
        raise ValueError("--decoder (an INT8 mask decoder) is offered for --backend openvino only")
    if keep_fp32 and backend == "inc":
        raise ValueError("--keep-fp32 is not offered for --backend inc (its PT2E quantizer is configured by module type)")
    if model_type != "auto" and backend != "openvino":
        raise ValueError(f"--model-type {model_type} is NNCF's preset: --backend openvino only")
    for pattern in keep_fp32:
        try:
            re.compile(pattern)  # a bad expression fails here, before any work
        except re.error as err:
            raise ValueError(f"--keep-fp32 {pattern!r} is not a regular expression ({err})") from err

    metadata = {**metadata, "quantizer": f"{QUANTIZERS[backend]} {importlib.metadata.version(QUANTIZERS[backend])}",
                "calibration_images": len(images), "keep_fp32": keep_fp32, "model_type": model_type,
                "quantized_parts": ["encoder"] + (["decoder"] if decoder_calibration else [])
                + (["clicks"] if click_calibration else [])}
    if decoder_calibration:
        metadata["decoder_calibration_inputs"] = len(decoder_calibration)
    if click_calibration:
        metadata["clicks_calibration_inputs"] = len(click_calibration)

    def build(folder: Path) -> dict[str, Path]:
        paths = export_onnx(model, folder)
        rest = {part: path for part, path in paths.items() if part != "encoder"}  # decoder and head stay FP32
        if backend == "openvino":
            encoder = quantize_openvino(paths["encoder"], folder / "encoder_int8.xml", images, keep_fp32, model_type)
            if decoder_calibration:
                rest["decoder"] = quantize_openvino(rest["decoder"], folder / "decoder_int8.xml", decoder_calibration,
                                                    keep_fp32, model_type)
                if decoder_check:
                    metadata["mask_dice_vs_fp32"] = mask_agreement(model, rest["decoder"], decoder_check)
                    metadata["mask_dice_vs_fp32_inputs"] = len(decoder_check)
            if click_calibration:
                rest["clicks"] = quantize_openvino(rest["clicks"], folder / "clicks_int8.xml", click_calibration,
                                                   keep_fp32, model_type)
                if click_check:
                    metadata["click_mask_dice_vs_fp32"] = mask_agreement(model, rest["clicks"], click_check)
                    metadata["click_mask_dice_vs_fp32_inputs"] = len(click_check)
            rest = {part: path if path.suffix == ".xml" else onnx_to_openvino(path, path.with_suffix(".xml"))
                    for part, path in rest.items()}
        elif backend == "onnxruntime":
            encoder = quantize_onnxruntime(paths["encoder"], folder / "encoder_int8.onnx", images, keep_fp32)
        elif backend == "optimum":
            encoder = quantize_optimum(paths["encoder"], folder / "encoder_int8.onnx", images, keep_fp32)
            metadata["optimum_config"] = optimum_config_name(cpu_flags())
        else:
            encoder = quantize_inc(model, folder / "encoder_int8.pt2", images)
        if check_images:  # read by write_variant after build: the manifest records it
            metadata["embedding_rel_error"] = embedding_error(model, encoder, check_images)
            metadata["embedding_rel_error_images"] = len(check_images)
        return {"encoder": encoder, **rest}

    # optimum writes an ONNX graph and inc a torch.export encoder beside ONNX Runtime decoder and head.
    runtime = {"optimum": "onnxruntime"}.get(backend, backend)
    return write_variant(out, model, build, runtime, "int8", metadata)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compress.quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="zoo name or checkpoint path")
    parser.add_argument("--backend", choices=QUANTIZERS, default="openvino")
    parser.add_argument("--calib", type=Path, nargs="+", default=[data_split("train")],
                        help="challenge npz directories with calibration images (default: the train split)")
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--keep-fp32", nargs="*", default=[], metavar="REGEX", help="layer names left in FP32")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="auto", help="NNCF's preset (openvino)")
    parser.add_argument("--decoder", action="store_true",
                        help="quantize the mask decoder too (openvino), calibrated on --n-calib images with ground "
                             "truth: the model's embedding, a box of one label, the modality; its clicks graph too, "
                             "on as many simulated clicks (1 to 5 after the box, the previous logits as mask prompt)")
    parser.add_argument("--check", type=Path, nargs="*", default=[data_split("val")],
                        help="npz directories whose images measure the embedding error (none: not measured)")
    parser.add_argument("--n-check", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="variant folder (default runs/compress/<model>_<backend>_int8)")
    parser.add_argument("--ship", default=None, metavar="NAME", help="also ship the variant in the zoo as NAME")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n_calib < 1:
        parser.error("--n-calib must be at least 1")
    return args


def run(args) -> Path:
    out = args.out or RUNS_DIR / "compress" / f"{Path(args.model).stem}_{args.backend}_int8"
    refuse_overwriting_inputs(out, [*args.calib, *(args.check or []), *([Path(args.model)] if Path(args.model).exists() else [])], "--out")
    model, metadata = load_parent(args.model)
    images = calibration_images(args.calib, args.n_calib, args.seed, skipped=getattr(args, "skipped", None))
    check = calibration_images(args.check, args.n_check, args.seed + 1) if args.check and args.n_check else None
    metadata.update(calibration_data=[str(d) for d in args.calib], seed=args.seed,
                    check_data=[str(d) for d in args.check or []])
    decoder_calibration = decoder_check = click_calibration = click_check = None
    if args.decoder:
        if args.backend != "openvino":  # before any embedding is computed
            raise ValueError("--decoder (an INT8 mask decoder) is offered for --backend openvino only")
        decoder_calibration = decoder_inputs(model, args.calib, args.n_calib, args.seed, getattr(args, "skipped", None))
        click_calibration = click_inputs(model, args.calib, args.n_calib, args.seed, getattr(args, "skipped", None))
        if args.check and args.n_check:
            decoder_check = decoder_inputs(model, args.check, args.n_check, args.seed + 1)
            click_check = click_inputs(model, args.check, args.n_check, args.seed + 1)
    quantize_variant(model, out, args.backend, images, args.keep_fp32, metadata, args.model_type, check,
                     decoder_calibration, decoder_check, click_calibration, click_check)
    meta = read_manifest(out)["metadata"]
    print(f"wrote {out}: {args.backend} INT8 encoder calibrated on {len(images)} images, "
          + (f"INT8 decoder on {len(decoder_calibration)} boxes" if decoder_calibration else "FP32 decoder")
          + (f"; embedding relative error {meta['embedding_rel_error']:.4f} on {len(check)} images" if check else "")
          + (f"; masks' Dice vs FP32 {meta['mask_dice_vs_fp32']:.4f} on {len(decoder_check)} boxes" if decoder_check else "")
          + (f", with clicks {meta['click_mask_dice_vs_fp32']:.4f}" if click_check else ""))
    if args.ship:
        from zoo.index import add_model, committed_parent

        # Only the INT8 graphs are new: a parent committed in the zoo gives the float ones on load.
        quantized_only = committed_parent(out) is not None
        entry = add_model(args.ship, out, description=ship_description(read_manifest(out)), quantized_only=quantized_only)
        print(f"shipped {out} as zoo model {entry['name']!r} ({entry['file']}"
              + (f"; its float graphs are {entry['derived_from']}'s)" if quantized_only else ")"))
    return out


def ship_description(manifest: dict) -> str:
    """The zoo index's account of an INT8 variant: how it was made, how far it is from FP32, where it is faster."""
    meta = manifest["metadata"]
    made = (f"{meta['parent']} with its encoder quantized to static INT8 by {meta['quantizer']} on "
            f"{meta['calibration_images']} train images" + (f", {meta['model_type']} preset" if meta.get("model_type", "auto") != "auto" else "")
            + (f", layers matching {' '.join(meta['keep_fp32'])} kept float" if meta.get("keep_fp32") else "")
            + ("; decoder INT8 too" + (" (with clicks too)" if "clicks" in meta.get("quantized_parts", []) else "")
               + ", head FP32" if "decoder" in meta.get("quantized_parts", []) else "; decoder and head FP32"))
    error = (f"; embedding relative error {meta['embedding_rel_error']:.3f} on {meta['embedding_rel_error_images']} val images"
             if "embedding_rel_error" in meta else "")
    error += (f"; masks' Dice vs FP32 {meta['mask_dice_vs_fp32']:.3f} on {meta['mask_dice_vs_fp32_inputs']} val boxes"
              if "mask_dice_vs_fp32" in meta else "")
    error += (f" ({meta['click_mask_dice_vs_fp32']:.3f} on {meta['click_mask_dice_vs_fp32_inputs']} with clicks)"
              if "click_mask_dice_vs_fp32" in meta else "")
    return (made + error + ". Faster than FP32 on CPUs with INT8 dot-product instructions (AVX512_VNNI, AVX-VNNI, "
            "AMX); on AVX2-only CPUs INT8 is not faster than FP32 (zoo.runtime.cpu.auto_precision)")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
