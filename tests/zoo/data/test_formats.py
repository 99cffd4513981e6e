import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file

from tests.helpers import nifti_header, write_dicom_series, write_volume
from zoo.data.formats import (
    apply_window,
    list_inputs,
    read_image,
    read_label_map,
    relabel_consecutive,
    scale_percentiles,
    tight_boxes,
    to_uint8,
    write_labels,
)
from zoo.data.io import CaseError, load_case


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_volume_axes_are_z_y_x_and_labels_go_back_in_the_same_geometry(tmp_path, suffix):
    volume = np.zeros((4, 5, 6), np.int16)
    volume[2, 3, 5] = 700  # slice z=2, row y=3, column x=5
    path = write_volume(tmp_path / f"ct{suffix}", volume)
    assert sitk.ReadImage(str(path)).GetPixel(5, 3, 2) == 700  # ITK index (x, y, z) = NIfTI (i, j, k)
    image = read_image(path)
    assert image.is_3d and image.array.shape == (4, 5, 6) and image.array[2, 3, 5] == 700
    assert image.spacing.tolist() == pytest.approx([3.0, 0.7, 0.8])  # [z, y, x]
    labels = (image.array > 0).astype(np.uint8) * 7
    out = write_labels(labels, image, tmp_path / "out" / path.name)
    written = sitk.ReadImage(str(out))
    assert written.GetPixel(5, 3, 2) == 7 and sitk.GetArrayFromImage(written).sum() == 7
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, get)() == getattr(image.geometry, get)(), get
    if suffix.startswith(".nii"):
        assert nifti_header(out) == nifti_header(path)  # the affine (sform and qform) as stored
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]  # no temporary left behind


def test_nibabel_sees_the_documented_transpose_and_the_same_affine(tmp_path):
    nibabel = pytest.importorskip("nibabel")  # a test dependency: the docs tell nibabel users the transpose
    volume = np.random.default_rng(0).integers(-1000, 1000, (4, 5, 6)).astype(np.int16)
    path = write_volume(tmp_path / "ct.nii.gz", volume)
    image = read_image(path)
    stored = nibabel.load(path)
    assert np.array_equal(np.asanyarray(stored.dataobj).transpose(2, 1, 0), image.array)
    out = write_labels((image.array > 0).astype(np.uint8), image, tmp_path / "out" / "ct.nii.gz")
    written = nibabel.load(out)
    assert np.array_equal(written.affine, stored.affine) and written.shape == stored.shape
    assert np.array_equal(np.asanyarray(written.dataobj).transpose(2, 1, 0), image.array > 0)


def test_dicom_file_is_read_in_hounsfield_units_with_its_modality():
    path = get_testdata_file("CT_small.dcm")
    dataset = pydicom.dcmread(path)
    image = read_image(path)
    assert (image.format, image.modality, image.is_3d, image.array.shape) == ("dicom", "CT", False, (128, 128))
    hounsfield = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert np.array_equal(image.array, hounsfield)
    assert image.geometry.GetSpacing()[:2] == pytest.approx([float(v) for v in dataset.PixelSpacing])
    assert image.labels_name == "CT_small.nii.gz"
    pixels, rule = to_uint8(image)
    assert rule == "window 40,400" and np.array_equal(pixels, apply_window(hounsfield, 40, 400))


def test_dicom_series_folder_is_one_input(tmp_path):
    series = write_dicom_series(tmp_path / "series")
    assert list_inputs(series) == [series]
    image = read_image(series)
    assert image.is_3d and image.array.shape == (3, 128, 128) and image.modality == "CT"
    assert image.spacing[0] == pytest.approx(5.0) and image.labels_name == "series.nii.gz"
    (tmp_path / "notes.txt").write_text("x")
    assert list_inputs(tmp_path) == [tmp_path / "notes.txt", series]  # a folder of inputs: each entry is one


def test_hounsfield_window_inverts_exactly():
    pixels = np.arange(256, dtype=np.uint8)
    hounsfield = np.rint(pixels / 255 * 400 + (40 - 200)).astype(np.int16)  # rounded to integer HU, as CT stores
    assert np.array_equal(apply_window(hounsfield, 40, 400), pixels)
    assert apply_window(np.array([-1000, 240, 3000]), 40, 400).tolist() == [0, 255, 255]


def test_intensity_rules(tmp_path):
    rng = np.random.default_rng(0)
    mr = rng.normal(300, 80, (3, 20, 20)).astype(np.float32)
    image = read_image(write_volume(tmp_path / "mr.nii.gz", mr))
    pixels, rule = to_uint8(image)
    assert rule == "percentiles 0.5-99.5" and pixels.dtype == np.uint8
    assert pixels.min() == 0 and pixels.max() == 255 and np.array_equal(pixels, scale_percentiles(mr))
    assert to_uint8(image, window=(300, 100))[1] == "window 300,100"
    ct = read_image(write_volume(tmp_path / "ct.nii.gz", np.full((3, 4, 4), -1000, np.int16)))
    assert to_uint8(ct)[1] == "window 40,400"  # Hounsfield air: CT without being told
    assert to_uint8(read_image(write_volume(tmp_path / "ct2.nii.gz", mr)), "CT")[1] == "window 40,400"
    as_stored = read_image(write_volume(tmp_path / "u8.nii.gz", (mr > 300).astype(np.uint8) * 200))
    assert to_uint8(as_stored, "CT") == (as_stored.array, "as stored")
    rgb = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    pixels, rule = to_uint8(read_image(tmp_path / "rgb.png"))
    assert rule == "as stored" and np.array_equal(pixels, rgb)


def test_pictures_and_label_maps(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").array.shape == (6, 8, 3)  # alpha dropped
    sixteen = (np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "b.tif")
    assert np.array_equal(read_image(tmp_path / "b.tif").array, sixteen)
    grey = read_image(tmp_path / "b.tif")
    palette = Image.fromarray(np.array([[0, 3], [5, 0]], np.uint8).repeat(3, 0).repeat(4, 1)[:5])
    palette.putpalette([255, 0, 0] * 256)  # every index is red: reading colours would lose the labels
    palette.save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "P"
    assert set(np.unique(read_image(tmp_path / "mask.png", labels=True).array)) == {0, 3, 5}  # indices, not colours
    with pytest.raises(CaseError, match="differs from the image's"):
        read_label_map(tmp_path / "mask.png", grey)
    Image.fromarray(np.eye(6, 8, dtype=bool)).save(tmp_path / "binary.png")
    assert read_image(tmp_path / "binary.png", labels=True).array.tolist() == np.eye(6, 8, dtype=np.uint8).tolist()
    Image.fromarray(rgba).save(tmp_path / "rgb_mask.png")
    with pytest.raises(CaseError, match="needs one channel"):
        read_image(tmp_path / "rgb_mask.png", labels=True)


@pytest.mark.parametrize("name, content, problem", [
    ("broken.png", b"\x89PNG\r\n\x1a\n not really", "not a readable png image"),
    ("broken.nii.gz", b"garbage", "not a readable nifti image"),
    ("notes.txt", b"text", "unsupported file type .txt"),
    ("scan", b"no DICOM preamble", "unsupported file type (no suffix, not DICOM)"),
])
def test_unreadable_files_give_one_line_naming_them(tmp_path, name, content, problem):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CaseError) as caught:
        read_image(tmp_path / name)
    assert problem in str(caught.value) and name in str(caught.value) and "\n" not in str(caught.value)


def test_multi_frame_and_4d_images_are_refused(tmp_path):
    frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (1, 2)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(CaseError, match="holds 2 frames"):
        read_image(tmp_path / "stack.tif")
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkInt16), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(CaseError, match="a 4D image"):
        read_image(tmp_path / "4d.nii.gz")


def test_relabel_and_tight_boxes_match_the_challenge_boxes(val_dir):
    for name in ("3DBox_CT_IBSISTS_STS032.npz", "2DBox_Mammography_DDSMtissue_A0002-RIGHTMLO.npz"):
        case = load_case(val_dir / name)
        gts = case.gts * 10  # values 10, 20, ...: relabelled 1..N in ascending order
        consecutive, values = relabel_consecutive(gts)
        assert np.array_equal(consecutive, case.gts)
        assert values.tolist() == list(range(10, 10 * len(case.boxes) + 1, 10))
        assert np.array_equal(tight_boxes(consecutive), case.boxes), name
    many = np.arange(300, dtype=np.int32).reshape(15, 20)
    consecutive, values = relabel_consecutive(many)
    assert consecutive.dtype == np.uint16 and consecutive.max() == 299 and len(values) == 299
