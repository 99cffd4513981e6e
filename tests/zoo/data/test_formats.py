import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file

from tests.helpers import dicom_slices, nifti_header, write_dicom_series, write_volume
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
    with pytest.raises(CaseError) as caught:
        read_image(tmp_path / "stack.tif")  # readable, and refused: said so, naming the file once
    message = str(caught.value)
    assert "holds 2 frames (pages); refused" in message and "not a readable" not in message
    assert message.count("stack.tif") == 1
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


# Geometry is compared, not assumed (#33).

def flipped_x_pair(tmp_path, shape=(12, 10, 6)):
    """A CT (nibabel, voxel (i, j, k) = (x, y, z)) and its mask of one object, the mask stored with the x axis the
    other way round (another tool's output): the same anatomy, mirrored voxels, the same shape."""
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    image = np.random.default_rng(0).integers(-100, 100, shape).astype(np.int16)
    truth = np.zeros(shape, np.uint8)
    truth[1:4, 2:6, 1:4] = 3  # near x = 0: mirrored, it would sit near the other side
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1  # stored voxel i is voxel n - 1 - i of the image
    nibabel.save(nibabel.Nifti1Image(image, affine), tmp_path / "ct.nii.gz")
    nibabel.save(nibabel.Nifti1Image(truth[::-1].copy(), affine @ flip), tmp_path / "mask.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz", truth.transpose(2, 1, 0)  # truth as (z, y, x)


def test_a_mask_stored_with_the_opposite_x_axis_is_resampled_into_the_image_not_used_mirrored(tmp_path):
    from zoo.data.formats import describe_frame

    ct, mask, truth = flipped_x_pair(tmp_path)
    image = read_image(ct)
    stored = read_image(mask, labels=True)
    assert stored.array.shape == image.array.shape and not np.array_equal(stored.array, truth)  # what was used before
    assert np.array_equal(read_label_map(mask, image), truth)
    (note,) = image.notes
    assert "mask.nii.gz is in another frame: resampled into the image's voxels (nearest neighbour" in note
    assert describe_frame(stored.geometry) in note and describe_frame(image.geometry) in note  # both frames named
    assert "axes RPS" in note and "axes LPS" in note


def test_a_mask_whose_objects_fall_outside_the_image_is_refused_naming_both_frames(tmp_path):
    ct, _, truth = flipped_x_pair(tmp_path)
    affine = nibabel.load(ct).affine.copy()
    affine[:3, 3] += 300.0  # another patient position: nothing of it lies in the image
    nibabel.save(nibabel.Nifti1Image(truth.transpose(2, 1, 0).copy(), affine), tmp_path / "far.nii.gz")
    with pytest.raises(CaseError) as caught:
        read_label_map(tmp_path / "far.nii.gz", read_image(ct), "prompt mask")
    message = str(caught.value)
    assert "far.nii.gz: prompt mask is in another frame than ct.nii.gz, and object(s) 3 fall outside" in message
    assert message.count("origin") == 2 and "\n" not in message


def test_the_same_frame_is_taken_voxel_for_voxel(tmp_path):
    volume = np.random.default_rng(0).integers(0, 5, (4, 5, 6)).astype(np.uint8)
    image = read_image(write_volume(tmp_path / "a.mha", volume))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "a.mha")), str(tmp_path / "a.nii.gz"))  # float32 geometry
    assert np.array_equal(read_label_map(tmp_path / "a.nii.gz", image), volume) and image.notes == []


def nifti_with(path, sform, sform_code, qform, qform_code):
    data = np.zeros((6, 5, 4), np.int16)
    data[1, 2, 3] = 700
    image = nibabel.Nifti1Image(data, None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    nibabel.save(image, path)
    return path


AFFINE_Q = np.array([[2.0, 0, 0, 10], [0, 3, 0, 20], [0, 0, 4, 30], [0, 0, 0, 1]])
AFFINE_S = np.array([[-2.0, 0, 0, 90], [0, 3, 0, -60], [0, 0, 4, 30], [0, 0, 0, 1]])
SHEARED = AFFINE_S + np.array([[0, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("sform, sform_code, qform, qform_code", [
    (AFFINE_S, 2, AFFINE_Q, 1),  # sform != qform: sform-first tools (nibabel, FSL) read the sform
    (AFFINE_S, 4, None, 0),  # an MNI sform and no qform
    (SHEARED, 2, AFFINE_Q, 1),  # a shear no direction matrix can hold
], ids=["sform-differs-from-qform", "sform-code-4-qform-0", "sheared-sform"])
def test_nifti_labels_carry_the_header_as_read(tmp_path, sform, sform_code, qform, qform_code):
    path = nifti_with(tmp_path / "ct.nii.gz", sform, sform_code, qform, qform_code)
    image = read_image(path)
    out = write_labels((image.array > 0).astype(np.uint8), image, tmp_path / "out" / "ct.nii.gz")
    source, written = nibabel.load(path), nibabel.load(out)
    for get in ("get_sform", "get_qform"):
        (matrix, code), (expected, expected_code) = getattr(written.header, get)(coded=True), \
            getattr(source.header, get)(coded=True)
        assert code == expected_code, get
        assert (matrix is None and expected is None) or np.array_equal(matrix, expected), get
    assert np.array_equal(written.affine, source.affine)
    assert np.asanyarray(written.dataobj)[1, 2, 3] == 1 and np.asanyarray(written.dataobj).sum() == 1  # aligned
    assert written.get_data_dtype() == np.uint8


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd", ".tif"])
def test_nan_and_inf_are_refused_in_every_format_before_a_reader_zeroes_them(tmp_path, suffix):
    volume = np.full((3, 4, 5), -1000.0, np.float32)  # CT in HU: NaN padding must not become 0 HU, water
    volume[0, 0, 0], volume[2, 3, 1] = np.nan, np.inf
    path = tmp_path / f"ct{suffix}"
    if suffix.startswith(".nii"):
        nibabel.save(nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), path)
        assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()  # what SimpleITK makes of it
    elif suffix == ".tif":
        Image.fromarray(volume[0]).save(path)
    else:
        write_volume(path, volume)
    with pytest.raises(CaseError) as caught:
        read_image(path)
    message = str(caught.value)
    count = 1 if suffix == ".tif" else 2
    assert f"contains {count} NaN or Inf value(s)" in message and "first at x=0, y=0" in message, message
    assert "fill them" in message and "\n" not in message


def test_a_photo_is_read_as_its_exif_orientation_shows_it(tmp_path):
    shown = np.zeros((30, 50, 3), np.uint8)  # as a viewer shows it: 30 rows, 50 columns
    shown[2:8, 30:45] = 255
    stored = np.rot90(shown, k=1)  # the camera's frame: orientation 6 turns it 90° clockwise for display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "photo.jpg")
    assert image.array.shape == (30, 50, 3)
    assert np.array_equal(image.array, np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg"))))
    assert np.abs(image.array.astype(int) - shown).max() < 40  # JPEG rounding only
    assert image.notes == ["turned 90° clockwise as its EXIF orientation (6) says, as viewers show it: the labels "
                           "are in that frame"]


# DICOM folders are checked as a PACS importer checks them (#33).

def test_a_series_with_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    series = dicom_slices(tmp_path / "scan", positions=[0, 5, 10, 20, 25])  # 15 mm is missing
    assert list_inputs(series) == [series]
    with pytest.raises(CaseError) as caught:
        read_image(series)
    assert ("a gap of 10 mm between slice2.dcm and slice3.dcm where the slices are 5 mm apart (1 slice(s) missing?)"
            in str(caught.value))
    uneven = dicom_slices(tmp_path / "uneven", positions=[0, 5, 10, 13, 18])
    with pytest.raises(CaseError, match="uneven slice spacing: 3 mm between slice2.dcm and slice3.dcm, 5 mm"):
        read_image(uneven)
    twice = dicom_slices(tmp_path / "twice", positions=[0, 5, 5, 10])
    with pytest.raises(CaseError, match="slice1.dcm and slice2.dcm are slices at one position"):
        read_image(twice)


def test_a_localizer_sharing_the_series_uid_is_another_series(tmp_path):
    series = dicom_slices(tmp_path / "scan", positions=[0, 5, 10, 15])
    dicom_slices(series, positions=[0], orientation=[1, 0, 0, 0, 0, -1], names=["scout.dcm"], exist_ok=True)
    for call in (list_inputs, read_image):
        with pytest.raises(CaseError) as caught:
            call(series)
        message = str(caught.value)
        assert "2 series found (by SeriesInstanceUID and orientation)" in message
        assert "axial, 4 file(s): slice0.dcm … slice3.dcm" in message and "coronal, 1 file(s): scout.dcm" in message


def test_two_series_in_one_folder_are_named_and_refused(tmp_path):
    folder = dicom_slices(tmp_path / "study", positions=[0, 5, 10], uid="1.2.826.0.1.1", names=["a0.dcm", "a1.dcm", "a2.dcm"])
    dicom_slices(folder, positions=[0, 5, 10], uid="1.2.826.0.1.2", names=["b0.dcm", "b1.dcm", "b2.dcm"],
                 exist_ok=True)
    with pytest.raises(CaseError) as caught:
        list_inputs(folder)
    assert "2 series found" in str(caught.value)
    assert "series 1.2.826.0.1.1" in str(caught.value) and "series 1.2.826.0.1.2" in str(caught.value)


def test_files_beside_a_series_are_skipped_by_name_and_single_images_stay_inputs(tmp_path):
    series = dicom_slices(tmp_path / "scan", positions=[0, 5, 10])
    (series / "README.txt").write_text("exported by the PACS")
    assert list_inputs(series) == [series]  # one input, not 4 separate ones
    image = read_image(series)
    assert image.array.shape == (3, 128, 128) and image.spacing[0] == pytest.approx(5.0)
    assert image.notes == ["skipped 1 file(s) that are not DICOM: README.txt"]
    xrays = tmp_path / "xrays"  # single-image DICOM files, each its own series: each an input
    for i in range(2):
        dicom_slices(xrays, positions=[0], uid=f"1.2.826.0.2.{i}", names=[f"x{i}.dcm"], exist_ok=True)
    assert list_inputs(xrays) == [xrays / "x0.dcm", xrays / "x1.dcm"]
    (xrays / "scan").mkdir()
    for path in series.glob("slice*.dcm"):
        path.rename(xrays / path.name)  # a series beside other inputs: which images belong together?
    with pytest.raises(CaseError, match="beside other inputs"):
        list_inputs(xrays)
