"""Segment your own images — NIfTI, MHA, NRRD, DICOM (file or series folder), PNG, JPEG, TIFF — from a prompt mask
or boxes; the labels are written in the input's format and geometry.

    python -m zoo.segment INPUT -o OUT_DIR (--prompt-mask MASK | --boxes BOXES.json) [--model NAME]
        [--modality auto|head|CT|MR|...] [--window LEVEL,WIDTH] [--overlay]

--prompt-mask: a label map of the input; each label value gets one tight box (a 3D box for a volume) and keeps its
value in the output. A mask in another physical frame than its volume (a flipped axis, another origin, spacing or
size) is resampled into the volume's voxels (nearest neighbour), with a note naming both frames. --boxes: JSON {"<input file name>": [[x0, y0, x1, y1], ...]} for 2D images,
[[x0, y0, z0, x1, y1, z1], ...] for volumes, inclusive voxel indices: x the column, y the row, z the slice (see
zoo.data.formats for the axes), whole numbers; labels are 1..N in box order. Keys naming no input are named. For a folder INPUT, MASK is a folder of masks named like
the inputs (or like their outputs). Intensities are made 8-bit as the challenge data were (zoo.data.formats.to_uint8),
and the case goes through zoo.predict.segment_case, the one inference path. OUT_DIR/<input name> (a JPEG's labels:
.png; a DICOM's: <name>.nii.gz) holds the labels, `--overlay` adds <name>_overlay.png, and OUT_DIR/segment.csv
has one row per input: the modality used (and where it came from), the intensity rule, seconds, status, notes (what
reading it did that a user should know: files of a series folder skipped, an EXIF rotation, a mask resampled). Runs
into one OUT_DIR share segment.csv: each adds its rows (replacing those of the inputs it redid), concurrent runs
included. Temporary files a killed run left in OUT_DIR are removed by the next run; Ctrl-C keeps the rows of the
inputs done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zoo.cli import positive_int, run_cli
from zoo.data.formats import (
    ImageFile,
    challenge_image,
    label_map_boxes,
    label_map_for,
    list_inputs,
    parse_window,
    read_image,
    to_uint8,
    write_labels,
)
from zoo.data.io import (
    Case,
    CaseError,
    check_boxes,
    clean_stale_temps,
    held_interrupts,
    interrupted_by,
    merge_csv_atomic,
    refuse_overwriting_inputs,
)
from zoo.data.overlay import encode_png, overlay_picture, write_bytes_atomic
from zoo.index import AUTO
from zoo.modalities import MODALITIES, canonical_modality
from zoo.predict import ModalityChoice, prepare_output_dir, segment_case

REPORT_NAME = "segment.csv"
REPORT_FIELDS = ["input", "output", "modality", "modality_source", "head_modality", "intensity", "n_objects", "seconds",
                 "status", "error", "notes"]


def read_boxes_json(path: Path) -> dict[str, list]:
    """The --boxes file (UTF-8, a byte-order mark allowed, as Windows editors write one); ValueError (the run stops)
    when it is not a JSON object of box lists."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})")
    if not isinstance(entries, dict):
        # a ValueError, as for every bad argument: run_cli stops with exit 2
        raise ValueError(f"{path}: expected a JSON object of box lists by input file name")  # noqa: TRY004
    return entries


def boxes_from_json(entries: dict, json_path: Path, image: ImageFile) -> tuple[np.ndarray, np.ndarray]:
    """This input's boxes from the --boxes file -> (boxes (N, 4|6) float64, label values 1..N). Coordinates are
    JSON numbers holding whole voxel indices: a string ("12"), a boolean or a fraction (12.5: which voxel?) is
    refused, naming the box."""
    if image.path.name not in entries:
        raise CaseError(image.path, f"no boxes for {image.path.name!r} in {json_path}")
    width = 6 if image.is_3d else 4
    kind = "[x0, y0, z0, x1, y1, z1] (a volume)" if image.is_3d else "[x0, y0, x1, y1] (a 2D image)"
    given = entries[image.path.name]
    if not isinstance(given, list) or not given or not all(isinstance(b, list) and len(b) == width for b in given):
        raise CaseError(image.path, f"boxes in {json_path.name} must be a non-empty list of {kind}")
    for i, box in enumerate(given):
        for value in box:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CaseError(image.path, f"box {i} {box} in {json_path.name}: coordinates must be JSON numbers, "
                                            f"not {type(value).__name__} {value!r}")
            if not float(value).is_integer():
                raise CaseError(image.path, f"box {i} {box} in {json_path.name}: {value!r} is not a whole number; "
                                            "boxes are inclusive voxel indices")
    boxes = np.array(given, dtype=np.float64)
    check_boxes(image.path, boxes, image.spatial_shape, image.is_3d, inclusive=True)
    return boxes, np.arange(1, len(boxes) + 1)


def unknown_keys(entries: dict, inputs: list[Path]) -> list[str]:
    """Keys of the --boxes file that name no input (a typo, or the path instead of the file name)."""
    names = {path.name for path in inputs}
    return [key for key in entries if key not in names]


def segment_file(model, path: Path, output_dir: Path, modalities: ModalityChoice, *, prompt_mask: Path | None = None,
                 boxes_json: tuple[dict, Path] | None = None, window: tuple[float, float] | None = None,
                 overlay: bool = False, protected: set[Path] | None = None, taken: set[Path] | None = None,
                 report: list[dict] | None = None) -> dict:
    """Segment one input into output_dir; returns its report row, also appended to `report` when given. CaseError
    before anything is written. `protected`: resolved paths never to write (inputs, masks); `taken`: outputs of
    earlier inputs of this run (a.jpg and a.png both make a.png), to which this input's are added. Ctrl-C while the
    outputs are written is held until they and the row are in place (a file written always has its row)."""
    protected, taken = protected or set(), taken if taken is not None else set()
    image = read_image(path)
    output = output_dir / image.labels_name
    overlay_path = output_dir / f"{image.stem}_overlay.png"
    for target in (output, overlay_path) if overlay else (output,):
        if target.resolve() in protected:
            raise CaseError(path, f"output {target} would overwrite an input; choose another output folder")
        if target.resolve() in taken:
            raise CaseError(path, f"output {target} was already written for another input of the same name")
    if prompt_mask is not None:
        _, values, boxes = label_map_boxes(label_map_for(prompt_mask, image, "prompt mask"), image, "prompt mask")
        boxes = boxes.astype(np.float64)
    else:
        boxes, values = boxes_from_json(*boxes_json, image)
    for note in image.notes:
        tqdm.write(f"note: {path.name}: {note}", file=sys.stderr)
    given = None if modalities.choice in ("auto", "head") else canonical_modality(modalities.choice)
    pixels, intensity = to_uint8(image, given, window)
    case = Case(path=path, image=challenge_image(pixels, image.is_3d), boxes=boxes, gts=None, spacing=image.spacing, modality=image.modality)
    start = time.perf_counter()
    result = segment_case(model, case, modalities)
    seconds = time.perf_counter() - start
    if len(values) > np.iinfo(result.segs.dtype).max:
        raise CaseError(path, f"{len(values)} objects; zoo.predict's {result.segs.dtype} label maps hold at most "
                              f"{np.iinfo(result.segs.dtype).max}")
    labels = np.concatenate([[0], values])[result.segs]  # label i (box order) -> its value
    picture = encode_png(overlay_picture(pixels, labels)) if overlay else None
    row = {"input": path.name, "output": output.name, "modality": result.modality or "",
           "modality_source": result.modality_source, "head_modality": result.head_modality or "",
           "intensity": intensity, "n_objects": len(values), "seconds": f"{seconds:.3f}", "status": "ok", "error": "",
           "notes": "; ".join(image.notes)}
    held: list[int] = []
    with held_interrupts(held):
        write_labels(labels, image, output)
        taken.add(output.resolve())
        if picture is not None:
            write_bytes_atomic(overlay_path, picture)
            taken.add(overlay_path.resolve())
        if report is not None:
            report.append(row)
    if held:
        raise KeyboardInterrupt
    return row


def segment_files(model, inputs: list[Path], output_dir: Path, *, modality: str = "auto",
                  prompt_mask: Path | None = None,
                  boxes_file: Path | None = None, window: tuple[float, float] | None = None, overlay: bool = False,
                  progress: bool = True, rows: list[dict] | None = None) -> list[dict]:
    """Segment every input; a bad one is reported on one line naming it and skipped. One report row per input,
    appended to `rows` (given: the caller keeps those of the inputs done when Ctrl-C stops the run) as each is done."""
    if (prompt_mask is None) == (boxes_file is None):
        raise ValueError("give exactly one of a prompt mask or a boxes file")
    modalities = ModalityChoice(model, modality)
    boxes_json = (read_boxes_json(boxes_file), boxes_file) if boxes_file is not None else None
    if boxes_json is not None and unknown_keys(boxes_json[0], inputs):
        print(f"warning: {boxes_file}: no input is named {', '.join(map(repr, unknown_keys(boxes_json[0], inputs)))}; "
              "keys are input file names (a DICOM series: its folder's name), so those boxes are not used",
              file=sys.stderr)
    protected = {p.resolve() for p in inputs}
    if prompt_mask is not None:
        masks = list(prompt_mask.iterdir()) if prompt_mask.is_dir() else [prompt_mask]
        protected |= {p.resolve() for p in masks}
    rows, taken = rows if rows is not None else [], set()
    for path in tqdm(inputs, desc="segmenting", unit="image", disable=not progress):
        try:
            row = segment_file(model, path, output_dir, modalities, prompt_mask=prompt_mask, boxes_json=boxes_json,
                               window=window, overlay=overlay, protected=protected, taken=taken, report=rows)
            tqdm.write(f"{path.name}: {row['n_objects']} object(s), modality {row['modality'] or 'none'} "
                       f"({row['modality_source']}), intensity {row['intensity']} -> {output_dir / row['output']}")
        except CaseError as err:
            if interrupted_by(err):  # Ctrl-C inside a library's cleanup: a stop, not a bad input
                raise KeyboardInterrupt from err
            rows.append(dict.fromkeys(REPORT_FIELDS, "") | {"input": path.name, "status": "failed",
                                                             "error": err.problem})
            tqdm.write(f"error: {err}", file=sys.stderr)
    return rows


def run(args: argparse.Namespace) -> None:
    from zoo.index import load  # here, so that --help is fast

    inputs = list_inputs(args.input)
    refuse_overwriting_inputs(args.output, [p for p in (args.input, args.prompt_mask, args.boxes) if p], "-o")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    prepare_output_dir(args.output)  # writable; temporary files of a killed earlier run removed
    rows = []
    try:
        segment_files(model, inputs, args.output, modality=args.modality, prompt_mask=args.prompt_mask,
                      boxes_file=args.boxes, window=args.window, overlay=args.overlay, rows=rows)
    except KeyboardInterrupt:  # the inputs done keep their rows; the one in progress leaves no file
        clean_stale_temps(args.output, own=True)
        merge_csv_atomic(args.output / REPORT_NAME, rows, REPORT_FIELDS, key="input")
        raise
    merge_csv_atomic(args.output / REPORT_NAME, rows, REPORT_FIELDS, key="input")
    args.skipped.extend(row["input"] for row in rows if row["status"] != "ok")
    print(f"segmented {len(rows) - len(args.skipped)} of {len(rows)} inputs into {args.output}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zoo.segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="an image file, a DICOM series folder, or a folder of inputs")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the label maps and segment.csv")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-mask", type=Path,
                         help="label map in the input's geometry (a folder for a folder INPUT)")
    prompts.add_argument("--boxes", type=Path, help="JSON {\"<input file name>\": [[x0, y0, (z0,) x1, y1, (z1)], ...]}")
    parser.add_argument("--model", default=AUTO,
                        help="'auto' (default: the champion in this CPU's fastest precision, named with why), a zoo name or a checkpoint path")
    parser.add_argument("--modality", default="auto",
                        help="auto (a DICOM header's, else the modality head's), head, or one of "
                        + ", ".join(MODALITIES))
    parser.add_argument("--window", type=parse_window, default=None,
                        help="intensity window LEVEL,WIDTH (default for CT: 40,400, soft tissue)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write <name>_overlay.png (contours over the image)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
