"""Segment your own images — NIfTI, MHA, NRRD, DICOM (file or series folder), PNG, JPEG, TIFF — from a prompt mask
or boxes; the labels are written in the input's format and geometry.

    python -m zoo.segment INPUT -o OUT_DIR (--prompt-mask MASK | --boxes BOXES.json) [--points POINTS.json]
        [--model NAME] [--modality auto|head|CT|MR|...] [--window LEVEL,WIDTH] [--overlay]

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

--points: clicks that correct the boxes' masks (docs/interactive.md), JSON in the --boxes convention:
{"<input file name>": [{"label": 1, "fg": [[x, y(, z)], ...], "bg": [[x, y(, z)], ...]}, ...]}. `label` names an
object: its box's number (1..N in --boxes order) or its value in the --prompt-mask; fg clicks mark missed object,
bg clicks false object. Each object is refined click by click as zoo.interactive.Refinement refines it (its fg
clicks, then its bg clicks, in the order given: each click is one step with the previous step's logits); in a
volume a click's slice is decoded again and propagation rerun from it outward. A label without a box starts box-free:
its box is the whole image (a volume: the whole slice of its first fg click), then its clicks apply; it needs an fg
click, and its value is kept in the output. The model must take clicks; one no click stage trained gets a warning.
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
from zoo.interactive import UNTRAINED_CLICKS, Click, Refinement, untrained_clicks
from zoo.modalities import MODALITIES, canonical_modality
from zoo.predict import ModalityChoice, prepare_output_dir, segment_case

REPORT_NAME = "segment.csv"
REPORT_FIELDS = ["input", "output", "modality", "modality_source", "head_modality", "intensity", "n_objects", "seconds",
                 "status", "error", "n_clicks", "notes"]


def read_boxes_json(path: Path, what: str = "box lists") -> dict[str, list]:
    """The --boxes (or --points) file (UTF-8, a byte-order mark allowed, as Windows editors write one); ValueError
    (the run stops) when it is not a JSON object of lists by input file name."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})")
    if not isinstance(entries, dict):
        # a ValueError, as for every bad argument: run_cli stops with exit 2
        raise ValueError(f"{path}: expected a JSON object of {what} by input file name")  # noqa: TRY004
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
    """Keys of the --boxes (or --points) file that name no input (a typo, or the path instead of the file name)."""
    names = {path.name for path in inputs}
    return [key for key in entries if key not in names]


def is_point(point, size: int) -> bool:
    """Whether `point` is a click of `size` coordinates that are JSON numbers (a string or a boolean is refused, as in
    --boxes)."""
    return isinstance(point, list) and len(point) == size and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)


def clicks_from_json(entries: dict, json_path: Path, image: ImageFile, values: np.ndarray) -> list[tuple[int, list[Click]]]:
    """This input's clicks from the --points file: [(label value, [Click, ...] in the order they apply)], fg clicks
    first; [] when the file names no clicks for it. CaseError naming the input for a malformed entry or a click
    outside the image; a label without a box needs an fg click (its box-free start)."""
    objects = entries.get(image.path.name, [])
    kind = "[x, y, z] (a volume)" if image.is_3d else "[x, y] (a 2D image)"
    if not isinstance(objects, list):
        raise CaseError(image.path, f"{json_path.name}: expected a list of {{'label', 'fg', 'bg'}} objects")
    shape = image.spatial_shape  # (H, W) or (D, H, W)
    found = []
    for entry in objects:
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), int) or isinstance(entry["label"], bool) \
                or entry["label"] < 1 or not set(entry) <= {"label", "fg", "bg"}:
            raise CaseError(image.path, f"{json_path.name}: each object is {{\"label\": N >= 1, \"fg\": [...], \"bg\": [...]}}")
        clicks = []
        for key, positive in (("fg", True), ("bg", False)):
            given = entry.get(key, [])
            if not isinstance(given, list) or not all(is_point(point, len(shape)) for point in given):
                raise CaseError(image.path, f"{json_path.name}: label {entry['label']}: {key} must be a list of {kind}")
            points = np.array(given, dtype=np.float64).reshape(-1, len(shape))
            for point in points:
                position = tuple(int(round(v)) for v in point[::-1])  # (z,) y, x: array order
                if not all(0 <= p < s for p, s in zip(position, shape)) or not np.isfinite(point).all():
                    raise CaseError(image.path, f"{json_path.name}: label {entry['label']}: click {point.tolist()} lies "
                                                f"outside the image ({' x '.join(map(str, shape[::-1]))})")
                clicks.append(Click(position, positive))
        if entry["label"] not in values and not any(c.positive for c in clicks):
            raise CaseError(image.path, f"{json_path.name}: label {entry['label']} has no box: a box-free start needs an fg click")
        found.append((entry["label"], clicks))
    return found


def box_free(clicks: list[Click], image: ImageFile) -> np.ndarray:
    """The box of a label given by clicks alone: the whole image; a volume's whole slice of its first fg click
    (inclusive pixel indices, x and y, as --boxes)."""
    height, width = image.spatial_shape[-2:]
    if not image.is_3d:
        return np.array([0, 0, width - 1, height - 1], dtype=np.float64)
    z = next(c.position[0] for c in clicks if c.positive)
    return np.array([0, 0, z, width - 1, height - 1, z], dtype=np.float64)


def segment_file(model, path: Path, output_dir: Path, modalities: ModalityChoice, *, prompt_mask: Path | None = None,
                 boxes_json: tuple[dict, Path] | None = None, window: tuple[float, float] | None = None,
                 overlay: bool = False, protected: set[Path] | None = None, taken: set[Path] | None = None,
                 report: list[dict] | None = None, points_json: tuple[dict, Path] | None = None) -> dict:
    """Segment one input into output_dir; returns its report row, also appended to `report` when given. CaseError
    before anything is written. `protected`: resolved paths never to write (inputs, masks); `taken`: outputs of
    earlier inputs of this run (a.jpg and a.png both make a.png), to which this input's are added. Ctrl-C while the
    outputs are written is held until they and the row are in place (a file written always has its row).
    `points_json`: the --points file's clicks, each object refined click by click."""
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
    clicks = clicks_from_json(*points_json, image, values) if points_json is not None else []
    if clicks and not getattr(model, "takes_clicks", False):
        raise CaseError(path, "--points: this model takes no clicks (its exported variant has no clicks graph); "
                              "use its PyTorch form")
    for label, object_clicks in clicks:  # box-free starts: a box of their own, the label value kept
        if label not in values:
            boxes, values = np.vstack([boxes, box_free(object_clicks, image)]), np.append(values, label)
    for note in image.notes:
        tqdm.write(f"note: {path.name}: {note}", file=sys.stderr)
    given = None if modalities.choice in ("auto", "head") else canonical_modality(modalities.choice)
    pixels, intensity = to_uint8(image, given, window)
    case = Case(path=path, image=challenge_image(pixels, image.is_3d), boxes=boxes, gts=None, spacing=image.spacing, modality=image.modality)
    start = time.perf_counter()
    if clicks:
        with torch.inference_mode():
            refinement = Refinement(model, case, modalities)
            for label, object_clicks in clicks:
                index = int(np.flatnonzero(values == label)[0])
                for click in object_clicks:
                    refinement.click(index, click.position, click.positive)
        result = refinement.result
        result.segs = refinement.segs
    else:
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
           "n_clicks": sum(len(c) for _, c in clicks), "notes": "; ".join(image.notes)}
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
                  progress: bool = True, rows: list[dict] | None = None, points_file: Path | None = None) -> list[dict]:
    """Segment every input; a bad one is reported on one line naming it and skipped. One report row per input,
    appended to `rows` (given: the caller keeps those of the inputs done when Ctrl-C stops the run) as each is done.
    `points_file`: the --points JSON (clicks per object)."""
    if (prompt_mask is None) == (boxes_file is None):
        raise ValueError("give exactly one of a prompt mask or a boxes file")
    modalities = ModalityChoice(model, modality)
    boxes_json = (read_boxes_json(boxes_file), boxes_file) if boxes_file is not None else None
    points_json = (read_boxes_json(points_file, "click lists"), points_file) if points_file is not None else None
    for given, option in ((boxes_json, "boxes"), (points_json, "points")):
        if given is not None and unknown_keys(given[0], inputs):
            print(f"warning: {given[1]}: no input is named {', '.join(map(repr, unknown_keys(given[0], inputs)))}; "
                  f"keys are input file names (a DICOM series: its folder's name), so those {option} are not used",
                  file=sys.stderr)
    if points_json is not None and untrained_clicks(model):
        print(f"warning: --points: {UNTRAINED_CLICKS}", file=sys.stderr)
    protected = {p.resolve() for p in inputs}
    if prompt_mask is not None:
        masks = list(prompt_mask.iterdir()) if prompt_mask.is_dir() else [prompt_mask]
        protected |= {p.resolve() for p in masks}
    rows, taken = rows if rows is not None else [], set()
    for path in tqdm(inputs, desc="segmenting", unit="image", disable=not progress):
        try:
            row = segment_file(model, path, output_dir, modalities, prompt_mask=prompt_mask, boxes_json=boxes_json,
                               window=window, overlay=overlay, protected=protected, taken=taken, report=rows,
                               points_json=points_json)
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
    refuse_overwriting_inputs(args.output, [p for p in (args.input, args.prompt_mask, args.boxes, args.points) if p], "-o")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    prepare_output_dir(args.output)  # writable; temporary files of a killed earlier run removed
    rows = []
    try:
        segment_files(model, inputs, args.output, modality=args.modality, prompt_mask=args.prompt_mask,
                      boxes_file=args.boxes, window=args.window, overlay=args.overlay, rows=rows,
                      points_file=args.points)
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
    parser.add_argument("--points", type=Path, default=None,
                        help="clicks JSON {\"<input file name>\": [{\"label\": N, \"fg\": [[x, y(, z)], ...], \"bg\": [...]}]}: "
                             "each object refined click by click (a label without a box: a box-free start)")
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
