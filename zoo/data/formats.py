"""Users' image files: NIfTI, MHA, NRRD, DICOM, PNG, JPEG and TIFF in (an image array + its geometry), label maps
out in the same format and geometry; intensities made 8-bit as the challenge data were made.

Readers are the field's: SimpleITK reads NIfTI (.nii, .nii.gz), MetaImage (.mha), NRRD (.nrrd) and DICOM (one
file, or a series folder, rescale slope/intercept applied: CT comes in Hounsfield units); pydicom reads DICOM headers
(the series a folder holds, slice positions, Modality); nibabel reads a NIfTI's header (written back as it was read)
and checks its voxels for NaN / Inf before SimpleITK would turn them into 0; Pillow reads PNG, JPEG and TIFF.

Axes. A volume's array is the challenge's D×H×W: `array[z, y, x]` is the voxel at ITK index (x, y, z), which is
NIfTI voxel (i, j, k) = (x, y, z); with nibabel that is `img.get_fdata().transpose(2, 1, 0)`, and the inverse is the
same transpose. So x is the column and y the row of slice `array[z]`, z the slice along the third stored axis
(axial for an axial acquisition). Images are not reoriented or resampled: labels go back voxel for voxel, a NIfTI's
with its header as read (sform and qform with their codes, a shear included). Spacing [z, y, x] is SimpleITK's
(x, y, z) spacing reversed. A volume of one slice (a single DICOM file) is a 2D image. A photo is read as viewers
show it (its EXIF orientation applied).

Geometry is compared, not assumed: a label map given for a volume in another physical frame (another origin,
spacing, direction or size: the same anatomy stored with a flipped axis, say) is resampled into the image's voxels
(nearest neighbour, SimpleITK), and a note names both frames; one whose objects fall outside the image is refused.

DICOM folders are checked as a PACS importer checks them: one series per folder, grouped by SeriesInstanceUID and
orientation (a localizer sharing the series' UID is another series); several are named and refused; the slices of
a series must be evenly spaced (a missing slice is named); files that are not DICOM are skipped and named.

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
from dataclasses import dataclass, field
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
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


# DICOM series (zoo.data.formats reads a folder as one series, checked as a PACS importer checks it)
ORIENTATION_TOLERANCE = 1e-3  # ImageOrientationPatient cosines this close are one orientation
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the series' spacing; above it, a gap is named
# ITK's default tolerances (1e-6) are below a NIfTI's float32 storage of DICOM geometry: frames this close are one
COORDINATE_TOLERANCE = 1e-3  # of the smallest voxel spacing, for origins and spacings
DIRECTION_TOLERANCE = 1e-4
EXIF_ORIENTATIONS = {2: "mirrored left-right", 3: "turned 180°", 4: "mirrored top-bottom", 5: "transposed",
                     6: "turned 90° clockwise", 7: "transversed", 8: "turned 90° counter-clockwise"}


@dataclass
class DicomSeries:
    """DICOM files of one SeriesInstanceUID and one orientation (ImageOrientationPatient), headers read."""

    uid: str
    orientation: np.ndarray | None  # the 6 direction cosines of rows and columns
    files: list[Path]
    headers: list[pydicom.Dataset]

    def describe(self) -> str:
        description = self.headers[0].get("SeriesDescription")
        files = self.files[0].name if len(self.files) == 1 else f"{self.files[0].name} … {self.files[-1].name}"
        return (f"series {self.uid}{f' ({description})' if description else ''}, {orientation_name(self.orientation)}, "
                f"{len(self.files)} file(s): {files}")


@dataclass
class DicomFolder:
    """What a folder holds, DICOM-wise: its image series, DICOM files without pixels (DICOMDIR, reports), files that
    are not DICOM, and the other entries (subfolders, files in the other supported formats)."""

    series: list[DicomSeries]
    without_pixels: list[Path]
    not_dicom: list[Path]
    others: list[Path]

    def skipped(self) -> list[str]:
        """The notes naming what a series read from this folder leaves out."""
        notes = [f"skipped {len(self.others)} entries that are not DICOM files: "
                 + ", ".join(p.name for p in self.others)] if self.others else []
        if self.not_dicom:
            notes.append(f"skipped {len(self.not_dicom)} file(s) that are not DICOM: "
                         + ", ".join(p.name for p in self.not_dicom))
        if self.without_pixels:
            notes.append(f"skipped {len(self.without_pixels)} DICOM file(s) without an image (DICOMDIR, reports): "
                         + ", ".join(p.name for p in self.without_pixels))
        return notes


def orientation_name(orientation: np.ndarray | None) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' for ImageOrientationPatient cosines (their normal's axis)."""
    if orientation is None:
        return "orientation unknown"
    normal = np.cross(orientation[:3], orientation[3:])
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.9 else "oblique"


def _dicom_header(path: Path) -> pydicom.Dataset | None:
    """A file's DICOM header (large values such as the pixels deferred), or None for a file that is not DICOM: one
    with the DICM preamble, or a .dcm file that parses as DICOM without it."""
    preamble = pydicom.misc.is_dicom(path)
    if not preamble and file_suffix(path) != ".dcm":
        return None
    try:
        header = pydicom.dcmread(path, defer_size=1024, force=not preamble)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    return header if preamble or "SOPClassUID" in header or "PixelData" in header else None


def scan_dicom_folder(folder: Path) -> DicomFolder:
    """Read the DICOM headers of a folder's files and group the images by SeriesInstanceUID and orientation."""
    series: list[DicomSeries] = []
    without_pixels, not_dicom, others = [], [], []
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        suffix = file_suffix(path)
        if path.is_dir() or suffix in PICTURE_FORMATS or (suffix in VOLUME_FORMATS and suffix != ".dcm"):
            others.append(path)
            continue
        header = _dicom_header(path)
        if header is None:
            not_dicom.append(path)
            continue
        if "PixelData" not in header and "FloatPixelData" not in header and "DoubleFloatPixelData" not in header:
            without_pixels.append(path)
            continue
        uid = str(header.get("SeriesInstanceUID", "(no SeriesInstanceUID)"))
        cosines = header.get("ImageOrientationPatient")
        orientation = np.array([float(c) for c in cosines]) if cosines is not None and len(cosines) == 6 else None
        for group in series:
            if group.uid == uid and (
                    (group.orientation is None and orientation is None)
                    or (group.orientation is not None and orientation is not None
                        and np.allclose(group.orientation, orientation, atol=ORIENTATION_TOLERANCE))):
                group.files.append(path)
                group.headers.append(header)
                break
        else:
            series.append(DicomSeries(uid, orientation, [path], [header]))
    return DicomFolder(series, without_pixels, not_dicom, others)


def several_series(series: list[DicomSeries]) -> str:
    """The one-line problem of a folder holding several series, each named."""
    return (f"{len(series)} series found (by SeriesInstanceUID and orientation): "
            + "; ".join(s.describe() for s in series)
            + ". One series per folder is read: move each into a folder of its own")


def list_inputs(path: Path) -> list[Path]:
    """The inputs a command gets from `path`: the file itself; a folder holding one DICOM series as one input (its
    other files are named when it is read); a folder of single-file DICOM images, or of files in any format, entry by
    entry (unsupported ones are reported one by one when read). CaseError for a folder whose DICOM files form several
    series of several slices, each series named: which one was meant cannot be guessed."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CaseError(path, "no such file or directory")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise CaseError(path, "empty folder")
    found = scan_dicom_folder(path)
    stacked = [s for s in found.series if len(s.files) > 1]
    if not found.series or not stacked:
        return entries  # no DICOM, or DICOM images of one file each: every entry is an input
    if found.others:
        raise CaseError(path, f"holds DICOM slices ({'; '.join(s.describe() for s in stacked)}) beside other inputs "
                              f"({', '.join(p.name for p in found.others)}): give each series a folder of its own")
    if len(found.series) == 1:
        return [path]
    raise CaseError(path, several_series(found.series))


@dataclass
class ImageFile:
    """An image read from a user's file.

    array: as stored (any numeric dtype): (H, W) grey, (H, W, 3) RGB, or (D, H, W) volume.
    geometry: for SimpleITK formats, the image as read (origin, spacing, direction, layout: (1, H, W) for a
    one-slice volume), to write labels back with; None for PNG / JPEG / TIFF.
    modality: a DICOM header's modality (challenge name), else None.
    notes: one line each, what reading (or fitting a label map to) it did that changes what a user sees: files of a
    series folder skipped, an EXIF rotation applied, a label map resampled from another frame.
    nifti: for a NIfTI, nibabel's image (its header: sform and qform with their codes), for writing labels back.
    """

    path: Path
    format: str
    array: np.ndarray
    geometry: sitk.Image | None = None
    modality: str | None = None
    notes: list[str] = field(default_factory=list)  # what was done that the user should know (files skipped, ...)
    nifti: nibabel.Nifti1Image | None = None  # a NIfTI's header as nibabel read it (its voxels are not kept)

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


def _dicom_modality(header: pydicom.Dataset | None) -> str | None:
    code = header.get("Modality") if header is not None else None
    return DICOM_MODALITIES.get(str(code).upper()) if code else None


def _position_along(header: pydicom.Dataset, normal: np.ndarray) -> float | None:
    position = header.get("ImagePositionPatient")
    return float(np.dot([float(v) for v in position], normal)) if position is not None and len(position) == 3 else None


def ordered_slices(folder: Path, series: DicomSeries) -> list[Path]:
    """The files of a series in slice order (along the normal of its orientation, ascending, as GDCM orders them);
    CaseError naming the files when they cannot make one evenly spaced volume: slices of different sizes, a
    position or an orientation missing, two slices at one position, or a gap (a missing slice) or uneven spacing."""
    if len(series.files) == 1:
        return list(series.files)
    sizes = {(int(h.get("Rows", 0)), int(h.get("Columns", 0))) for h in series.headers}
    if len(sizes) > 1:
        raise CaseError(folder, f"{series.describe()}: slices of different sizes {sorted(sizes)} (rows, columns)")
    frames = [p.name for p, h in zip(series.files, series.headers) if int(h.get("NumberOfFrames", 1) or 1) > 1]
    if frames:
        raise CaseError(folder, f"{series.describe()}: multi-frame file(s) {', '.join(frames)} among its slices")
    if series.orientation is None:
        raise CaseError(folder, f"{series.describe()}: no ImageOrientationPatient, so its slices cannot be ordered")
    normal = np.cross(series.orientation[:3], series.orientation[3:])
    positions = [_position_along(h, normal) for h in series.headers]
    unplaced = [p.name for p, z in zip(series.files, positions) if z is None]
    if unplaced:
        raise CaseError(folder, f"{series.describe()}: no ImagePositionPatient in {', '.join(unplaced[:5])}, so its "
                                "slices cannot be ordered")
    order = np.argsort(positions, kind="stable")
    files, z = [series.files[i] for i in order], np.array(positions)[order]
    gaps = np.diff(z)
    same = np.flatnonzero(gaps < 1e-3)  # mm
    if len(same):
        a, b = files[same[0]].name, files[same[0] + 1].name
        raise CaseError(folder, f"{series.describe()}: {a} and {b} are slices at one position ({z[same[0]]:.4g} mm "
                                "along the slice normal): several acquisitions in one series (echoes, phases, "
                                "repeats)? Give each a folder of its own")
    values, counts = np.unique(np.round(gaps, 2), return_counts=True)
    step = float(values[counts == counts.max()].min())  # the commonest gap (the smallest of equals): the spacing
    uneven = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step)
    if len(uneven):
        i = uneven[0]
        a, b = files[i].name, files[i + 1].name
        missing = int(round(gaps[i] / step)) - 1
        what = (f"a gap of {gaps[i]:.4g} mm between {a} and {b} where the slices are {step:.4g} mm apart "
                f"({missing} slice(s) missing?)" if missing >= 1 else
                f"uneven slice spacing: {gaps[i]:.4g} mm between {a} and {b}, {step:.4g} mm elsewhere")
        raise CaseError(folder, f"{series.describe()}: {what}; refused, as its spacing would be wrong")
    return files


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, str | None, list[str]]:
    """A folder holding one DICOM series -> (the volume, its modality, notes on the files skipped)."""
    found = scan_dicom_folder(folder)
    if not found.series:
        seen = found.not_dicom + found.without_pixels + found.others
        raise CaseError(folder, "no DICOM image in this folder"
                                + (f" ({', '.join(p.name for p in seen[:10])}{' …' if len(seen) > 10 else ''})"
                                   if seen else ""))
    if len(found.series) > 1:
        raise CaseError(folder, several_series(found.series))
    series = found.series[0]
    files = ordered_slices(folder, series)
    if len(files) == 1:
        image = sitk.ReadImage(str(files[0]))
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        image = reader.Execute()
    return image, _dicom_modality(series.headers[0]), found.skipped()


def _non_finite_problem(count: int, first: tuple[int, ...], total: int) -> str:
    where = ", ".join(f"{axis}={i}" for axis, i in zip("xyz", first))
    return (f"contains {count} NaN or Inf value(s) of {total} (first at {where}); refused rather than guessed "
            "(a reader would make them 0, water in CT): fill them, e.g. with the image minimum, and retry")


def _read_nifti_header(path: Path) -> nibabel.Nifti1Image:
    """A NIfTI as nibabel reads it (its header, written back with the labels), after checking its voxels for NaN /
    Inf: SimpleITK's reader turns them into 0 without a word. CaseError for either problem."""
    try:
        nifti = nibabel.load(path)
        scaled = np.isfinite(nifti.dataobj.slope) and np.isfinite(nifti.dataobj.inter)
        data = None if nifti.get_data_dtype().kind != "f" and scaled else np.asanyarray(nifti.dataobj)
    except (nibabel.filebasedimages.ImageFileError, OSError, ValueError, EOFError, AttributeError) as err:
        raise CaseError(path, f"not a readable nifti image (nibabel: {err})")
    if data is not None:  # integers, finitely scaled, have nothing to find
        bad = ~np.isfinite(data)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0][:3])
            raise CaseError(path, _non_finite_problem(int(bad.sum()), first, data.size))
    return nifti


def _read_sitk(path: Path, fmt: str) -> ImageFile:
    modality, notes, nifti = None, [], None
    try:
        if path.is_dir():
            image, modality, notes = _read_dicom_folder(path)
        else:
            nifti = _read_nifti_header(path) if fmt == "nifti" else None
            image = sitk.ReadImage(str(path))
            if fmt == "dicom":
                modality = _dicom_modality(_dicom_header(path))
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
    return ImageFile(path, fmt, array, image, modality, notes, nifti)


LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")  # one value per pixel: a label map's modes


def _read_picture(path: Path, fmt: str, labels: bool) -> ImageFile:
    notes = []
    try:
        with Image.open(path) as picture:
            frames = getattr(picture, "n_frames", 1)
            orientation = picture.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation in EXIF_ORIENTATIONS:  # read as every viewer shows it, not as stored
                picture = ImageOps.exif_transpose(picture)
                notes.append(f"{EXIF_ORIENTATIONS[orientation]} as its EXIF orientation ({orientation}) says, as "
                             "viewers show it: the labels are in that frame")
            mode = picture.mode  # a label map's values are kept as stored: a palette image's indices, not colours
            if not labels and mode in ("1", "LA"):
                picture = picture.convert("L")  # alpha dropped
            elif not labels and mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
                picture = picture.convert("RGB")  # palette, RGBA (alpha dropped), CMYK, YCbCr
            array = np.asarray(picture)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CaseError(path, f"not a readable {fmt} image ({err})")
    if frames > 1:  # readable, and refused
        raise CaseError(path, f"holds {frames} frames (pages); refused: one 2D image per file is supported")
    if labels and mode not in LABEL_MODES:
        raise CaseError(path, f"a label map needs one channel; this {fmt} has mode {mode}")
    if array.dtype == bool:  # a 1-bit label map: labels 0 and 1
        array = array.astype(np.uint8)
    return ImageFile(path, fmt, array, notes=notes)


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
    elif suffix in VOLUME_FORMATS or pydicom.misc.is_dicom(path):
        result = _read_sitk(path, VOLUME_FORMATS.get(suffix, "dicom"))
    else:
        supported = ", ".join(sorted(set(VOLUME_FORMATS) | set(PICTURE_FORMATS)))
        raise CaseError(path, f"unsupported file type {suffix or '(no suffix, not DICOM)'}; "
                              f"supported: {supported}, DICOM files (any suffix) and a DICOM series folder")
    if result.array.size == 0:
        raise CaseError(path, f"empty image (shape {result.array.shape})")
    if result.array.dtype.kind not in "iuf":
        raise CaseError(path, f"pixel type {result.array.dtype} is not numeric")
    if result.array.dtype.kind == "f":
        bad = ~np.isfinite(result.array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0][: 3 if result.is_3d else 2][::-1])  # (x, y[, z])
            raise CaseError(path, _non_finite_problem(int(bad.sum()), first, result.array.size))
    return result


def same_frame(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share their voxel grid: size, and origin, spacing and direction within the tolerances
    above (a NIfTI stores DICOM geometry as float32)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    tolerance = COORDINATE_TOLERANCE * min(min(a.GetSpacing()), min(b.GetSpacing()))
    return (np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=tolerance)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_TOLERANCE))


def describe_frame(image: sitk.Image) -> str:
    """'size (6, 5, 4), origin (10, -20, 5) mm, spacing (0.8, 0.7, 3) mm, axes LPS': a frame in one phrase (axes:
    where x, y, z point, DICOM's letters; 'oblique' added when they are not along the patient's axes)."""
    def numbers(values):
        return "(" + ", ".join(f"{v + 0.0:.4g}" for v in values) + ")"  # + 0.0: no '-0'

    text = f"size {image.GetSize()}, origin {numbers(image.GetOrigin())} mm, spacing {numbers(image.GetSpacing())} mm"
    if image.GetDimension() == 3:
        direction = np.array(image.GetDirection()).reshape(3, 3)
        axes = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        oblique = not np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=DIRECTION_TOLERANCE)
        return f"{text}, axes {axes}{' (oblique)' if oblique else ''}"
    return f"{text}, direction {numbers(image.GetDirection())}"


def _fit_to_frame(labels: ImageFile, image: ImageFile, what: str) -> np.ndarray:
    """A label map read in another physical frame than `image`'s -> resampled into the image's voxels (nearest
    neighbour: values kept), with a note naming both frames. CaseError when an object falls outside the image."""
    source, target = labels.geometry, image.geometry
    if source.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(labels.path, f"a {what} needs one value per voxel")
    resampled = sitk.Resample(source, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, source.GetPixelID())
    array = sitk.GetArrayFromImage(resampled).reshape(image.spatial_shape)
    lost = np.setdiff1d(np.unique(labels.array), np.unique(array))
    lost = lost[lost != 0]
    frames = f"{what} {describe_frame(source)}; image {describe_frame(target)}"
    if len(lost):
        raise CaseError(labels.path, f"{what} is in another frame than {image.path.name}, and object(s) "
                                     f"{', '.join(str(v) for v in lost[:10])} fall outside the image there ({frames})")
    image.notes.append(f"{what} {labels.path.name} is in another frame: resampled into the image's voxels "
                       f"(nearest neighbour; {frames})")
    return array


def read_label_map(path: str | Path, image: ImageFile, what: str = "label map") -> np.ndarray:
    """A label map for `image` -> non-negative integer array of `image.spatial_shape`; CaseError (naming the label
    file) when it cannot be read, has another shape, non-integer or negative values.

    When both have a physical frame (SimpleITK formats of the same dimension), the frames are compared: the same
    frame is taken voxel for voxel, another (a flipped axis, another origin, spacing or size) is resampled into the
    image's (see _fit_to_frame). Without frames (PNG, JPEG, TIFF) the shapes must match."""
    labels = read_image(path, labels=True)
    image.notes.extend(f"{what} {labels.path.name}: {note}" for note in labels.notes)  # an EXIF turn, say
    array = labels.array
    framed = (image.geometry is not None and labels.geometry is not None
              and image.geometry.GetDimension() == labels.geometry.GetDimension())
    if framed and not same_frame(labels.geometry, image.geometry):
        array = _fit_to_frame(labels, image, what)
    elif array.shape != image.spatial_shape:
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
    """Label map (image.spatial_shape, integer) -> `path` in `image`'s geometry, as the smallest unsigned type that
    holds the values; atomic. A NIfTI's labels carry its header as read (nibabel: sform and qform with their codes,
    a shear included; only the data type, scaling and display range change); other SimpleITK formats copy origin,
    spacing and direction; PNG / TIFF are 8-bit (16-bit beyond 255 labels)."""
    path = Path(path)
    if labels.shape != image.spatial_shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image's {image.spatial_shape}")
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if labels.max() <= np.iinfo(t).max)
    if image.geometry is None and dtype not in (np.uint8, np.uint16):
        raise CaseError(path, f"label values up to {labels.max()} do not fit a 16-bit {image.format} label map")
    labels = labels.astype(dtype)
    with atomic_path(path, suffix=".tmp" + file_suffix(path)) as tmp:
        if image.nifti is not None and file_suffix(path) in (".nii", ".nii.gz"):
            source = image.nifti
            header = source.header.copy()
            header.set_data_dtype(dtype)
            header.set_slope_inter(np.nan, np.nan)  # labels are stored as they are
            header["cal_min"], header["cal_max"] = 0, 0  # the image's display range would hide the labels
            stored = labels.reshape(image.geometry.GetSize()[::-1]).T.reshape(source.shape)  # (z, y, x) -> (i, j, k)
            nibabel.save(type(source)(stored, None, header), tmp)  # no affine given: the header's is written as read
        elif image.geometry is not None:
            out = sitk.GetImageFromArray(labels.reshape(image.geometry.GetSize()[::-1]))
            out.CopyInformation(image.geometry)
            sitk.WriteImage(out, str(tmp), useCompression=True)
        else:
            fmt = PILLOW_FORMAT.get(image.format, "PNG")  # a JPEG's labels are a PNG (see labels_name)
            Image.fromarray(labels).save(tmp, format=fmt)
    return path
