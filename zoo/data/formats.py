"""Users' image files: NIfTI, MHA, NRRD, DICOM, PNG, JPEG and TIFF in (an image array + its geometry), label maps
out in the same format and geometry; intensities made 8-bit as the challenge data were made.

Readers are the field's: SimpleITK reads NIfTI (.nii, .nii.gz), MetaImage (.mha), NRRD (.nrrd) and DICOM (one
file, or a series folder through GDCM, rescale slope/intercept applied: CT comes in Hounsfield units); pydicom
reads a DICOM header's Modality; Pillow reads PNG, JPEG and TIFF.

Axes. A volume's array is the challenge's D×H×W: `array[z, y, x]` is the voxel at ITK index (x, y, z), which is
NIfTI voxel (i, j, k) = (x, y, z); with nibabel that is `img.get_fdata().transpose(2, 1, 0)`, and the inverse is the
same transpose. So x is the column and y the row of slice `array[z]`, z the slice along the third stored axis
(axial for an axial acquisition). Nothing is reoriented or resampled: labels go back voxel for voxel. Spacing
[z, y, x] is SimpleITK's (x, y, z) spacing reversed. A volume of one slice (a single DICOM file) is a 2D image.

Intensities -> uint8, the first rule that applies (`to_uint8`):
  1. RGB stays RGB (8-bit).
  2. a window LEVEL,WIDTH given: clip to [LEVEL - WIDTH/2, LEVEL + WIDTH/2], scale to 0..255, round.
  3. 8-bit data stay as stored (display values already: photos, PNG exports, the challenge's own images).
  4. CT (the modality given, a DICOM Modality of CT, or values below -500, i.e. air in Hounsfield units): the
     soft-tissue window, level 40, width 400.
  5. otherwise: clip to the image's 0.5 and 99.5 percentiles, scale to 0..255, round.
MedSAM's pre_CT_MR.py scales the clipped image by its own min and max (the window's bounds whenever the image
reaches both, as any CT with air and bone does) and truncates; here the bounds are used and values rounded, so a
windowed image maps back exactly: a uint8 pixel p stored as HU = p / 255 * WIDTH + LEVEL - WIDTH / 2 (even rounded
to integer HU) windows back to p.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from zoo.data.io import CaseError, atomic_path, check_boxes

VOLUME_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".mha": "mha", ".nrrd": "nrrd", ".dcm": "dicom"}
PICTURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
PILLOW_FORMAT = {"png": "PNG", "tiff": "TIFF"}
SOFT_TISSUE_WINDOW = (40.0, 400.0)  # (level, width) in Hounsfield units
HOUNSFIELD_AIR_BELOW = -500  # no MR, PET or 8-bit image goes this low; CT air is -1000 HU
PERCENTILES = (0.5, 99.5)
# DICOM Modality (0008,0060) codes -> the challenge's modality names
DICOM_MODALITIES = {"CT": "CT", "MR": "MR", "PT": "PET", "US": "US", "MG": "Mammography", "CR": "X-Ray",
                    "DX": "X-Ray", "RG": "X-Ray", "XA": "X-Ray", "OPT": "OCT", "OP": "Fundus", "ES": "Endoscopy",
                    "SM": "Microscopy"}


def file_suffix(path: str | Path) -> str:
    """'.nii.gz' for a gzipped NIfTI, else the lower-cased last suffix ('' for none)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_dicom_series(folder: Path) -> bool:
    """A folder holding exactly one DICOM series (GDCM's series ids)."""
    return folder.is_dir() and len(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) == 1


def list_inputs(path: Path) -> list[Path]:
    """The inputs a command gets from `path`: the file itself; a DICOM series folder as one input; else every
    visible entry of the folder (unsupported ones are reported one by one when read)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CaseError(path, "no such file or directory")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    others = [p for p in entries if p.is_dir() or file_suffix(p) not in ("", ".dcm")]
    if not others and is_dicom_series(path):
        return [path]
    if not entries:
        raise CaseError(path, "empty folder")
    return entries


@dataclass
class ImageFile:
    """An image read from a user's file.

    array: as stored (any numeric dtype): (H, W) grey, (H, W, 3) RGB, or (D, H, W) volume.
    geometry: for SimpleITK formats, the image as read (origin, spacing, direction, layout: (1, H, W) for a
    one-slice volume), to write labels back with; None for PNG / JPEG / TIFF.
    modality: a DICOM header's modality (challenge name), else None.
    """

    path: Path
    format: str
    array: np.ndarray
    geometry: sitk.Image | None = None
    modality: str | None = None

    @property
    def is_3d(self) -> bool:
        return self.array.ndim == 3 and self.geometry is not None and self.geometry.GetNumberOfComponentsPerPixel() == 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(D, H, W) or (H, W): the shape a label map of this image has."""
        return self.array.shape if self.is_3d else self.array.shape[:2]

    @property
    def spacing(self) -> np.ndarray:
        """[z, y, x] in mm for a volume, [1, 1] for a 2D image (the challenge's placeholder)."""
        if not self.is_3d:
            return np.ones(2)
        return np.array(self.geometry.GetSpacing()[::-1], dtype=np.float64)

    @property
    def stem(self) -> str:
        """The file (or series folder) name without its format suffix: 'ct.nii.gz' -> 'ct'."""
        suffix = file_suffix(self.path) if self.path.is_file() else ""
        return self.path.name[: len(self.path.name) - len(suffix)]

    @property
    def labels_name(self) -> str:
        """Output file name: the input's, in its format; a JPEG's labels are a PNG, a DICOM's a NIfTI."""
        if self.format == "dicom":
            return self.stem + ".nii.gz"
        if self.format == "jpeg":
            return self.stem + ".png"
        return self.path.name


def _sitk_problem(err: RuntimeError) -> str:
    """SimpleITK's multi-line exception text -> its one informative line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    noise = ("Exception thrown", "itk::", "Location:", "File:", "Line:")
    useful = [line for line in lines if not line.startswith(noise)]
    return (useful or lines or ["unknown error"])[-1][:300]


def _dicom_modality(path: Path) -> str | None:
    try:
        code = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("Modality")  # GDCM read it already
    except (pydicom.errors.InvalidDicomError, OSError) as err:
        raise CaseError(path, f"not a readable DICOM file ({err})")
    return DICOM_MODALITIES.get(str(code).upper()) if code else None


def _read_sitk(path: Path, fmt: str) -> ImageFile:
    modality = None
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if len(series) != 1:
                raise CaseError(path, f"a folder must hold one DICOM series; found {len(series)}")
            files = reader.GetGDCMSeriesFileNames(str(path), series[0])
            reader.SetFileNames(files)
            image = reader.Execute()
            modality = _dicom_modality(Path(files[0]))
        else:
            image = sitk.ReadImage(str(path))
            if fmt == "dicom":
                modality = _dicom_modality(path)
    except RuntimeError as err:
        raise CaseError(path, f"not a readable {fmt} image ({_sitk_problem(err)})")
    dimension, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    if dimension not in (2, 3):
        raise CaseError(path, f"a {dimension}D image (size {image.GetSize()}); 2D images and 3D volumes are supported")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) — the challenge's D×H×W
    if dimension == 3 and array.shape[0] == 1:
        array = array[0]  # one slice: a 2D image; `geometry` keeps the (1, H, W) layout for writing back
    if components not in (1, 3) or (components == 3 and array.ndim != 3):
        raise CaseError(path, f"{components} components per voxel in a {dimension}D image; "
                              "grey volumes or RGB 2D images are supported")
    return ImageFile(path, fmt, array, image, modality)


def _read_picture(path: Path, fmt: str, labels: bool) -> ImageFile:
    try:
        with Image.open(path) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise CaseError(path, f"holds {picture.n_frames} frames; one 2D image per file is supported")
            if labels:  # label values as stored: a palette image's indices, never its colours
                if picture.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
                    raise CaseError(path, f"a label map needs one channel; this {fmt} has mode {picture.mode}")
            elif picture.mode in ("1", "LA"):
                picture = picture.convert("L")  # alpha dropped
            elif picture.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
                picture = picture.convert("RGB")  # palette, RGBA (alpha dropped), CMYK, YCbCr
            array = np.asarray(picture)
            if array.dtype == bool:  # a 1-bit label map: labels 0 and 1
                array = array.astype(np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CaseError(path, f"not a readable {fmt} image ({err})")
    return ImageFile(path, fmt, array)


def read_image(path: str | Path, labels: bool = False) -> ImageFile:
    """Read any supported file (or DICOM series folder); CaseError names the file and the problem.
    `labels`: read a label map (one channel, palette indices as stored)."""
    path = Path(path)
    if not path.exists():
        raise CaseError(path, "file does not exist")
    suffix = file_suffix(path)
    if path.is_dir():
        result = _read_sitk(path, "dicom")
    elif suffix in PICTURE_FORMATS:
        result = _read_picture(path, PICTURE_FORMATS[suffix], labels)
    elif suffix in VOLUME_FORMATS or (suffix == "" and pydicom.misc.is_dicom(path)):
        result = _read_sitk(path, VOLUME_FORMATS.get(suffix, "dicom"))
    else:
        supported = ", ".join(sorted(set(VOLUME_FORMATS) | set(PICTURE_FORMATS)))
        raise CaseError(path, f"unsupported file type {suffix or '(no suffix, not DICOM)'}; "
                              f"supported: {supported}, a DICOM series folder")
    if result.array.size == 0:
        raise CaseError(path, f"empty image (shape {result.array.shape})")
    if result.array.dtype.kind not in "iuf":
        raise CaseError(path, f"pixel type {result.array.dtype} is not numeric")
    if result.array.dtype.kind == "f" and not np.isfinite(result.array).all():
        raise CaseError(path, "contains NaN or Inf values")
    return result


def read_label_map(path: str | Path, image: ImageFile, what: str = "label map") -> np.ndarray:
    """A label map for `image` -> non-negative integer array of `image.spatial_shape`; CaseError (naming the label
    file) when it cannot be read, has another shape, non-integer or negative values."""
    labels = read_image(path, labels=True)
    array = labels.array
    if array.shape != image.spatial_shape:
        raise CaseError(labels.path, f"{what} shape {array.shape} differs from the image's {image.spatial_shape} "
                                     f"({image.path.name})")
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise CaseError(labels.path, f"{what} has non-integer values")
        array = array.astype(np.int64)
    if array.min() < 0:
        raise CaseError(labels.path, f"{what} has negative values (min {array.min()})")
    return array


def label_map_for(labels: Path, image: ImageFile, what: str = "label map") -> Path:
    """The label map that goes with `image`: `labels` itself, or in a `labels` folder the file named like the image
    or like its labels output (`image.labels_name`: a DICOM's <name>.nii.gz, a JPEG's .png)."""
    if not labels.is_dir():
        return labels
    for name in (image.path.name, image.labels_name):
        if (labels / name).exists():
            return labels / name
    raise CaseError(image.path, f"no {what} named {image.path.name!r} or {image.labels_name!r} in {labels}")


def relabel_consecutive(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map with any non-negative values -> (labels 1..N in ascending order of the original values, uint8, or
    uint16 beyond 255 objects; the original values (N,)). 0 stays background."""
    values = np.unique(labels)
    values = values[values != 0]
    dtype = np.uint8 if len(values) <= np.iinfo(np.uint8).max else np.uint16
    consecutive = np.where(labels != 0, np.searchsorted(values, labels) + 1, 0).astype(dtype)
    return consecutive, values


def tight_boxes(consecutive: np.ndarray) -> np.ndarray:
    """Labels 1..N (H, W) or (D, H, W) -> their tight boxes with inclusive indices, as the challenge builds them:
    (N, 4) [x0, y0, x1, y1] or (N, 6) [x0, y0, z0, x1, y1, z1], int64. Every label 1..N must be present."""
    boxes = []
    for label, slices in enumerate(ndimage.find_objects(consecutive), start=1):
        if slices is None:
            raise ValueError(f"label {label} is absent; labels must be 1..N")
        lows = [s.start for s in reversed(slices)]  # (x, y[, z]) from the array's ([z,] y, x)
        highs = [s.stop - 1 for s in reversed(slices)]
        boxes.append(lows + highs)
    return np.array(boxes, dtype=np.int64).reshape(len(boxes), 2 * consecutive.ndim)


def parse_window(text: str) -> tuple[float, float]:
    """'40,400' -> (level 40.0, width 400.0); the argparse type of --window."""
    try:
        level, width = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window takes LEVEL,WIDTH (e.g. 40,400), got {text!r}")
    if not width > 0:
        raise argparse.ArgumentTypeError(f"--window width must be positive, got {width:g}")
    return level, width


def label_map_boxes(path: str | Path, image: ImageFile,
                    what: str = "label map") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label map for `image` (see read_label_map) -> (its labels relabelled 1..N, the original values (N,), their
    tight boxes (N, 4) or (N, 6)); CaseError naming the file when it labels nothing or an object its box cannot
    prompt (the one box rule, zoo.data.io.check_boxes)."""
    consecutive, values = relabel_consecutive(read_label_map(path, image, what))
    if len(values) == 0:
        raise CaseError(path, f"{what} for {image.path.name} is empty: no labelled pixels")
    boxes = tight_boxes(consecutive)
    check_boxes(Path(path), boxes, image.spatial_shape, image.is_3d, inclusive=True,
                names=[f"object {value} (label {label})" for label, value in enumerate(values, start=1)])
    return consecutive, values, boxes


def challenge_image(pixels: np.ndarray, is_3d: bool) -> np.ndarray:
    """8-bit pixels as the challenge's images are: a grey 2D image copied into 3 channels (H, W, 3); a volume
    (D, H, W) and a colour image as they are."""
    return pixels if is_3d or pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)


def apply_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """Clip to [level - width/2, level + width/2] and scale to 0..255 (rounded) -> uint8 of the same shape."""
    low = level - width / 2
    scaled = (np.clip(array.astype(np.float64), low, low + width) - low) / width * 255
    return np.rint(scaled).astype(np.uint8)


def scale_percentiles(array: np.ndarray, low: float = PERCENTILES[0], high: float = PERCENTILES[1]) -> np.ndarray:
    """Clip to the array's `low` and `high` percentiles and scale to 0..255 (rounded) -> uint8 of the same shape;
    a constant image gives zeros."""
    bottom, top = np.percentile(array, [low, high])
    scaled = (np.clip(array.astype(np.float64), bottom, top) - bottom) / max(top - bottom, 1e-12) * 255
    return np.rint(scaled).astype(np.uint8)


def to_uint8(image: ImageFile, modality: str | None = None,
             window: tuple[float, float] | None = None) -> tuple[np.ndarray, str]:
    """The image's array as the challenge's uint8, by the rules in the module docstring -> (array of the same
    shape, the rule used, for reports: 'as stored', 'window 40,400', 'percentiles 0.5-99.5').
    `modality`: the one given by the user; None falls back to the DICOM header's, then to the HU test."""
    array = image.array
    if array.ndim == 3 and not image.is_3d:
        if array.dtype != np.uint8:
            raise CaseError(image.path, f"RGB image of dtype {array.dtype}; 8-bit RGB is supported")
        return array, "as stored"
    if window is not None:
        return apply_window(array, *window), f"window {window[0]:g},{window[1]:g}"
    if array.dtype == np.uint8:
        return array, "as stored"
    modality = modality or image.modality
    if modality == "CT" or (modality is None and array.min() < HOUNSFIELD_AIR_BELOW):
        return apply_window(array, *SOFT_TISSUE_WINDOW), f"window {SOFT_TISSUE_WINDOW[0]:g},{SOFT_TISSUE_WINDOW[1]:g}"
    return scale_percentiles(array), f"percentiles {PERCENTILES[0]:g}-{PERCENTILES[1]:g}"


def write_labels(labels: np.ndarray, image: ImageFile, path: str | Path) -> Path:
    """Label map (image.spatial_shape, integer) -> `path` in `image`'s geometry (SimpleITK formats: origin,
    spacing, direction copied) or as an 8/16-bit PNG / TIFF; the smallest unsigned type that holds the values.
    Atomic."""
    path = Path(path)
    if labels.shape != image.spatial_shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image's {image.spatial_shape}")
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if labels.max() <= np.iinfo(t).max)
    if image.geometry is None and dtype not in (np.uint8, np.uint16):
        raise CaseError(path, f"label values up to {labels.max()} do not fit a 16-bit {image.format} label map")
    labels = labels.astype(dtype)
    with atomic_path(path, suffix=".tmp" + file_suffix(path)) as tmp:
        if image.geometry is not None:
            out = sitk.GetImageFromArray(labels.reshape(image.geometry.GetSize()[::-1]))
            out.CopyInformation(image.geometry)
            sitk.WriteImage(out, str(tmp), useCompression=True)
        else:
            fmt = PILLOW_FORMAT.get(image.format, "PNG")  # a JPEG's labels are a PNG (see labels_name)
            Image.fromarray(labels).save(tmp, format=fmt)
    return path
