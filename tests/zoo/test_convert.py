import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file

from tests.helpers import write_volume
from zoo.convert import main
from zoo.data.io import load_case


def test_volume_round_trip_npz_nifti_npz_is_exact(val_dir, tmp_path):
    source = np.load(val_dir / "3DBox_PET_IBSISTS_STS001.npz")
    spacing = tuple(float(s) for s in source["spacing"][::-1])
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_volume(tmp_path / "images" / "sts001.nii.gz", source["imgs"], spacing)
    write_volume(tmp_path / "labels" / "sts001.nii.gz", source["gts"], spacing)
    images, labels, npz = (str(tmp_path / name) for name in ("images", "labels", "npz"))
    assert main([images, labels, "-o", npz, "--modality", "pet"]) == 0
    converted = np.load(tmp_path / "npz" / "3DBox_PET_sts001.npz")
    for key in ("imgs", "gts", "boxes"):
        assert converted[key].dtype == source[key].dtype and np.array_equal(converted[key], source[key]), key
    assert converted["spacing"] == pytest.approx(source["spacing"], rel=1e-6)  # NIfTI stores spacing as float32
    assert str(converted["modality"]) == "PET"
    case = load_case(tmp_path / "npz" / "3DBox_PET_sts001.npz")  # what distill and benchmarks read
    assert case.is_3d and case.modality == "PET"


def test_2d_round_trip_through_png_is_exact(val_dir, tmp_path):
    name = "2DBox_Mammography_DDSMtissue_A0002-RIGHTMLO"
    source = np.load(val_dir / f"{name}.npz")
    Image.fromarray(source["imgs"]).save(tmp_path / f"{name}.png")
    (tmp_path / "labels").mkdir()
    Image.fromarray(source["gts"]).save(tmp_path / "labels" / f"{name}.png")
    assert main([str(tmp_path / f"{name}.png"), str(tmp_path / "labels"), "-o", str(tmp_path / "npz"),
                 "--modality", "Mammography"]) == 0
    converted = np.load(tmp_path / "npz" / f"{name}.npz")  # the challenge name is kept, not prefixed twice
    for key in ("imgs", "gts", "boxes", "spacing"):
        assert np.array_equal(converted[key], source[key]), key


def test_labels_are_relabelled_consecutively_and_dicom_is_windowed(tmp_path):
    dicom = get_testdata_file("CT_small.dcm")
    labels = np.zeros((128, 128), np.uint16)
    labels[10:20, 10:30] = 700
    labels[50:60, 40:45] = 30
    Image.fromarray(labels).save(tmp_path / "labels.png")
    assert main([dicom, str(tmp_path / "labels.png"), "-o", str(tmp_path / "npz"), "--modality", "CT"]) == 0
    converted = np.load(tmp_path / "npz" / "2DBox_CT_CT_small.npz")
    assert converted["imgs"].shape == (128, 128, 3) and converted["imgs"].dtype == np.uint8
    assert converted["gts"][15, 15] == 2 and converted["gts"][55, 42] == 1  # 30 -> 1, 700 -> 2
    assert converted["boxes"].tolist() == [[40, 50, 44, 59], [10, 10, 29, 19]]
    assert converted["spacing"].tolist() == [1.0, 1.0]
    hounsfield = sitk.GetArrayFromImage(sitk.ReadImage(dicom))[0]
    expected = np.rint((np.clip(hounsfield, -160, 240) + 160) / 400 * 255)
    assert np.array_equal(converted["imgs"][..., 0], expected)


def test_bad_pairs_are_reported_and_skipped(tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    volume = np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    good = np.zeros_like(volume)
    good[1:4, 2:8, 3:9] = 2
    flat = np.zeros_like(volume)
    flat[1:4, 2:8, 3] = 1  # one column only: no x extent (one slice would do: an object may lie on one slice)
    for name, mask in {"good.nrrd": good, "flat.nrrd": flat, "empty.nrrd": good * 0}.items():
        write_volume(images / name, volume)
        write_volume(labels / name, mask)
    write_volume(images / "outside.nrrd", volume)  # the mask's frame lies 500 mm away: its object is not in the image
    write_volume(labels / "outside.nrrd", good, origin=(510.0, 480.0, 505.0))
    write_volume(images / "fewer_slices.nrrd", volume)  # 4 of the 5 slices, same grid: resampled, named in a note
    write_volume(labels / "fewer_slices.nrrd", good[:4])
    write_volume(images / "unlabelled.nrrd", volume)
    code = main([str(images), str(labels), "-o", str(tmp_path / "npz"), "--modality", "MR"])
    err = capsys.readouterr().err
    assert code == 1
    for name, problem in {"flat.nrrd": "spans a single x index", "outside.nrrd": "fall outside the image",
                          "empty.nrrd": "is empty", "unlabelled.nrrd": "no label map named"}.items():
        assert any(name in line and problem in line for line in err.splitlines()), (name, err)
    assert "note: fewer_slices.nrrd: label map fewer_slices.nrrd is in another frame: resampled" in err
    assert "size (16, 16, 4)" in err and "size (16, 16, 5)" in err  # both frames named
    assert sorted(p.name for p in (tmp_path / "npz").iterdir()) == ["3DBox_MR_fewer_slices.npz", "3DBox_MR_good.npz"]
    assert np.array_equal(np.load(tmp_path / "npz" / "3DBox_MR_fewer_slices.npz")["gts"], good // 2)
    assert main([str(images), str(labels), "-o", str(tmp_path / "npz"), "--modality", "Tomography"]) == 2


def test_a_dicom_series_with_a_missing_slice_is_refused_not_given_a_wrong_spacing(tmp_path, capsys):
    """zoo.convert wrote spacing 5.625 mm for a 5 mm series with one slice missing; it reads through the same checks
    as zoo.segment now: refused, the gap named, no npz written."""
    from tests.helpers import dicom_slices

    series = dicom_slices(tmp_path / "scan", positions=[0, 5, 10, 15, 25, 30, 35, 40, 45])  # 20 mm is missing
    labels = np.zeros((9, 128, 128), np.uint8)
    labels[2:6, 40:80, 40:80] = 1
    (tmp_path / "labels").mkdir()
    image = sitk.GetImageFromArray(labels)
    sitk.WriteImage(image, str(tmp_path / "labels" / "scan.nii.gz"))
    assert main([str(series), str(tmp_path / "labels"), "-o", str(tmp_path / "npz"), "--modality", "CT"]) == 1
    err = capsys.readouterr().err
    assert "a gap of 10 mm between slice3.dcm and slice4.dcm where the slices are 5 mm apart" in err
    assert not (tmp_path / "npz").exists() or not list((tmp_path / "npz").iterdir())
