import zipfile

import numpy as np
import pytest

from tests.conftest import write_npz
from zoo.io import CaseError, load_case, save_npz_atomic


def image2d(h=40, w=60):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_valid_2d_grey_image_becomes_three_channels(tmp_path):
    path = write_npz(tmp_path / "2DBox_US_0001.npz", imgs=image2d()[..., 0], boxes=np.array([[1, 2, 30, 20]]))
    case = load_case(path)
    assert case.image.shape == (40, 60, 3) and not case.is_3d
    assert case.modality == "US"
    assert np.all(case.image[..., 0] == case.image[..., 2])


def test_npz_modality_key_wins_over_name(tmp_path):
    path = write_npz(tmp_path / "case.npz", imgs=image2d(), boxes=np.array([1, 2, 30, 20]), modality=np.array("Fundus"))
    case = load_case(path)
    assert case.modality == "Fundus" and case.boxes.shape == (1, 4)


def test_valid_3d_case(tmp_path):
    vol = np.zeros((8, 20, 30), np.uint8)
    gts = np.zeros_like(vol)
    gts[2:5, 3:9, 4:10] = 1
    path = write_npz(tmp_path / "3DBox_CT_1.npz", imgs=vol, gts=gts, boxes=np.array([[4, 3, 2, 9, 8, 4]]),
                     spacing=np.array([2.0, 1.0, 1.0]))
    case = load_case(path)
    assert case.is_3d and case.spacing.tolist() == [2.0, 1.0, 1.0]


BAD_2D = {
    "missing imgs": (dict(boxes=np.array([[1, 1, 5, 5]])), "missing key 'imgs'"),
    "missing boxes": (dict(imgs=image2d()), "missing key 'boxes'"),
    "float image": (dict(imgs=image2d().astype(np.float64), boxes=np.array([[1, 1, 5, 5]])), "dtype float64"),
    "uint16 image": (dict(imgs=image2d().astype(np.uint16), boxes=np.array([[1, 1, 5, 5]])), "dtype uint16"),
    "nan image": (dict(imgs=np.full((10, 10, 3), np.nan, np.float32), boxes=np.array([[1, 1, 5, 5]])), "NaN or Inf"),
    "4 channels": (dict(imgs=np.zeros((10, 10, 4), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "H×W or H×W×3"),
    "4d image": (dict(imgs=np.zeros((2, 10, 10, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "H×W or H×W×3"),
    "empty image": (dict(imgs=np.zeros((0, 10, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "empty"),
    "zero boxes": (dict(imgs=image2d(), boxes=np.zeros((0, 4))), "at least one box"),
    "box columns": (dict(imgs=image2d(), boxes=np.zeros((1, 5))), r"N×4 \(2D\) or N×6 \(3D\)"),
    "negative box": (dict(imgs=image2d(), boxes=np.array([[-3, 1, 5, 5]])), "outside the image"),
    "box too wide": (dict(imgs=image2d(), boxes=np.array([[1, 1, 61, 5]])), "outside the image"),
    "x0 >= x1": (dict(imgs=image2d(), boxes=np.array([[9, 1, 9, 5]])), "x0 >= x1"),
    "nan box": (dict(imgs=image2d(), boxes=np.array([[1, 1, np.nan, 5]])), "NaN or Inf"),
    "gts count": (dict(imgs=image2d(), gts=np.ones((40, 60), np.uint8) * 2, boxes=np.array([[1, 1, 5, 5]])), "1 boxes but gts has labels 1..2"),
    "gts shape": (dict(imgs=image2d(), gts=np.ones((4, 6), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "does not match"),
}


@pytest.mark.parametrize("arrays, message", BAD_2D.values(), ids=BAD_2D.keys())
def test_bad_files_name_the_file_and_problem(tmp_path, arrays, message):
    path = write_npz(tmp_path / "2DBox_CT_bad.npz", **arrays)
    with pytest.raises(CaseError, match=message) as info:
        load_case(path)
    assert str(path) in str(info.value)


def test_3d_box_with_z0_not_below_z1(tmp_path):
    path = write_npz(tmp_path / "3DBox_CT_bad.npz", imgs=np.zeros((8, 20, 30), np.uint8),
                     boxes=np.array([[4, 3, 5, 9, 8, 5]]))
    with pytest.raises(CaseError, match="z0 >= z1"):
        load_case(path)


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "2DBox_CT_pickle.npz"
    np.savez(path, imgs=image2d(), boxes=np.array([[1, 1, 5, 5]]), extra=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CaseError, match="pickled object array"):
        load_case(path)


def test_truncated_zip_and_directory(tmp_path):
    good = write_npz(tmp_path / "good.npz", imgs=image2d(), boxes=np.array([[1, 1, 5, 5]]))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CaseError, match="not a readable npz"):
        load_case(truncated)
    not_npz = tmp_path / "other.npz"
    with zipfile.ZipFile(not_npz, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CaseError):
        load_case(not_npz)
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    with pytest.raises(CaseError, match="not a regular file"):
        load_case(folder)


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    out = save_npz_atomic(tmp_path / "sub" / "case.npz", segs=np.ones((3, 3), np.uint8))
    assert np.load(out)["segs"].sum() == 9
    assert [p.name for p in out.parent.iterdir()] == ["case.npz"]


def test_atomic_save_failure_keeps_previous_file(tmp_path):
    target = save_npz_atomic(tmp_path / "case.npz", segs=np.ones((2, 2), np.uint8))
    with pytest.raises(ValueError):
        save_npz_atomic(target, segs=np.array([object()]))  # object arrays are never pickled: fails mid-write
    assert np.load(target)["segs"].sum() == 4
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]
