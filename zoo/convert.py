"""Turn your own images and label maps (NIfTI, MHA, NRRD, DICOM, PNG, JPEG, TIFF) into challenge npz files, so that
distill.run, distill.finetune and benchmarks.run train and score on them.

    python -m zoo.convert IMAGES LABELS -o NPZ_DIR --modality MR [--window LEVEL,WIDTH]

IMAGES is a file, a DICOM series folder or a folder of inputs; LABELS the label map (a folder of label maps named
like the images, or like zoo.segment's outputs: a DICOM's <name>.nii.gz, a JPEG's .png). Each pair becomes
NPZ_DIR/2DBox_<Modality>_<name>.npz (3DBox_ for a volume; a name already so prefixed is kept) with
  imgs     uint8: 2D (H, W, 3) (grey copied into 3 channels), 3D (D, H, W); intensities as zoo.data.formats.to_uint8
  gts      the label values relabelled 1..N consecutively in ascending order of value (uint8; uint16 beyond 255)
  boxes    int64 tight inclusive boxes in label order: 2D [x0, y0, x1, y1], 3D [x0, y0, z0, x1, y1, z1]
  spacing  [z, y, x] in mm for 3D, [1, 1] for 2D
  modality the modality name
The one box rule (zoo.data.io.check_boxes) applies: an object in a single row or column is refused with its label
named (one on a single slice is kept). Images and label maps are read as zoo.segment reads them (zoo.data.formats):
a label map in another frame is resampled into the image's, DICOM series are checked (a missing slice is refused
rather than given a wrong spacing), NaN / Inf are refused; notes name what reading did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zoo.cli import run_cli
from zoo.data.formats import (
    ImageFile,
    challenge_image,
    label_map_boxes,
    label_map_for,
    list_inputs,
    parse_window,
    read_image,
    to_uint8,
)
from zoo.data.io import CaseError, clean_stale_temps, interrupted_by, save_npz_atomic
from zoo.modalities import MODALITIES, canonical_modality


def npz_name(image: ImageFile, modality: str) -> str:
    """'brain.nii.gz' -> '3DBox_MR_brain.npz'; '3DBox_MR_brain.nii.gz' stays '3DBox_MR_brain.npz'."""
    prefix = f"{'3D' if image.is_3d else '2D'}Box_{modality}_"
    return f"{image.stem if image.stem.startswith(prefix) else prefix + image.stem}.npz"


def challenge_arrays(image: ImageFile, label_path: Path, modality: str,
                     window: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """One image and its label map -> the challenge npz arrays (see the module docstring)."""
    pixels, _ = to_uint8(image, modality, window)
    gts, _, boxes = label_map_boxes(label_path, image)
    return {"imgs": challenge_image(pixels, image.is_3d), "gts": gts, "boxes": boxes, "spacing": image.spacing, "modality": np.array(modality)}


def convert_files(images: list[Path], labels: Path, output_dir: Path, modality: str,
                  window: tuple[float, float] | None = None, progress: bool = True) -> tuple[list[Path], list[Path]]:
    """Convert every image; a bad pair is reported on one line naming the file and skipped; what reading did that a
    user should know (files of a series folder skipped, an EXIF rotation, a label map resampled) is noted, one line
    each. Returns (npz files written, inputs skipped)."""
    written, skipped = [], []
    for path in tqdm(images, desc="converting", unit="image", disable=not progress):
        try:
            image = read_image(path)
            arrays = challenge_arrays(image, label_map_for(labels, image), modality, window)
            for note in image.notes:
                tqdm.write(f"note: {path.name}: {note}", file=sys.stderr)
            written.append(save_npz_atomic(output_dir / npz_name(image, modality), **arrays))
        except CaseError as err:
            if interrupted_by(err):  # Ctrl-C inside a library's cleanup: a stop, not a bad input
                raise KeyboardInterrupt from err
            tqdm.write(f"error: {err}", file=sys.stderr)
            skipped.append(path)
    return written, skipped


def run(args: argparse.Namespace) -> None:
    modality = canonical_modality(args.modality)
    if modality is None:
        raise ValueError(f"unknown modality {args.modality!r}; expected one of {', '.join(MODALITIES)}")
    images = list_inputs(args.images)
    if args.output.resolve() in {args.images.resolve(), args.labels.resolve()}:
        raise ValueError(f"{args.output}: the output folder holds the inputs; choose another")
    stale = clean_stale_temps(args.output)  # what a killed earlier run left
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted run: {', '.join(map(str, stale))}",
              file=sys.stderr)
    try:
        written, skipped = convert_files(images, args.labels, args.output, modality, args.window)
    except KeyboardInterrupt:
        clean_stale_temps(args.output, own=True)
        raise
    args.skipped.extend(skipped)
    print(f"converted {len(written)} of {len(images)} images into {args.output}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zoo.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="an image file, a DICOM series folder, or a folder of images")
    parser.add_argument("labels", type=Path, help="its label map, or a folder of label maps named like the images")
    parser.add_argument("-o", "--output", required=True, type=Path, help="folder for the challenge npz files")
    parser.add_argument("--modality", required=True, help="one of " + ", ".join(MODALITIES))
    parser.add_argument("--window", type=parse_window, default=None,
                        help="intensity window LEVEL,WIDTH (CT default 40,400)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
