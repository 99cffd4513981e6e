import numpy as np
import pytest

from tests.helpers import BAD_ARRAYS, write_file_problems, write_npz
from zoo.data.io import CaseError, load_case, save_npz_atomic


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


def test_2d_or_3d_is_read_from_image_shape_and_box_columns_together(tmp_path):
    color = write_npz(tmp_path / "2DBox_US_color.npz", imgs=image2d(300, 300), boxes=np.array([[0, 0, 0, 2, 100, 200]]))
    with pytest.raises(CaseError, match=r"2DBox_US_color.npz: imgs of shape \(300, 300, 3\) is an H×W×3 color image"):
        load_case(color)
    volume = write_npz(tmp_path / "3DBox_CT_4cols.npz", imgs=np.zeros((6, 20, 30), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    with pytest.raises(CaseError, match="3DBox_CT_4cols.npz: .* a D×H×W volume needs boxes of 6 columns"):
        load_case(volume)


# Checks of load_case that the shared bad-input corpus (tests/corpus.py, run through every command) leaves out.
BAD_ONLY_HERE = {
    "2DBox_CT_4_channels.npz": (dict(imgs=np.zeros((10, 10, 4), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "H×W or H×W×3"),
    "2DBox_CT_empty.npz": (dict(imgs=np.zeros((0, 10, 3), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "empty"),
    "2DBox_CT_box_columns.npz": (dict(imgs=image2d(), boxes=np.zeros((1, 5))), r"N×4 \(2D\) or N×6 \(3D\)"),
    "2DBox_CT_nan_box.npz": (dict(imgs=image2d(), boxes=np.array([[1, 1, np.nan, 5]])), "NaN or Inf"),
    "2DBox_CT_gts_count.npz": (dict(imgs=image2d(), gts=np.ones((40, 60), np.uint8) * 2, boxes=np.array([[1, 1, 5, 5]])),
                               "1 boxes but gts has labels 1..2"),
    "2DBox_CT_gts_shape.npz": (dict(imgs=image2d(), gts=np.ones((4, 6), np.uint8), boxes=np.array([[1, 1, 5, 5]])), "does not match"),
}
BAD = {**BAD_ARRAYS, **BAD_ONLY_HERE}


@pytest.mark.parametrize("name", BAD)
def test_bad_arrays_name_the_file_and_problem(tmp_path, name):
    arrays, message = BAD[name]
    path = write_npz(tmp_path / name, **arrays)
    with pytest.raises(CaseError, match=message) as info:
        load_case(path)
    assert str(path) in str(info.value)


def test_unreadable_files_name_the_file_and_problem(tmp_path):
    for name, message in write_file_problems(tmp_path).items():
        with pytest.raises(CaseError, match=message) as info:
            load_case(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


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


def test_the_overwrite_guard_follows_links_and_refuses_the_folder_holding_inputs(tmp_path):
    from zoo.data.io import OverwriteError, refuse_overwriting_inputs

    data = tmp_path / "data"
    data.mkdir()
    case = write_npz(data / "2DBox_US_a.npz", imgs=image2d(), boxes=np.array([[1, 2, 30, 20]]))
    (tmp_path / "link.npz").symlink_to(case)
    (tmp_path / "hard.npz").hardlink_to(case)
    for output in (case, data, tmp_path / "link.npz", tmp_path / "hard.npz", tmp_path / "data" / ".." / "data"):
        with pytest.raises(OverwriteError, match="--flag is the"):
            refuse_overwriting_inputs(output, [data, case], "--flag")
    for output in (data / "out", data / "timing.csv", tmp_path / "other.npz", tmp_path):
        refuse_overwriting_inputs(output, [data, case], "--flag")  # beside or above the inputs: allowed


def test_npz_inputs_names_what_it_does_not_read(tmp_path, capsys):
    from zoo.data.io import TEMP_PREFIX, npz_inputs

    write_npz(tmp_path / "2DBox_US_a.npz", imgs=image2d(), boxes=np.array([[1, 2, 30, 20]]))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "old_run").mkdir()
    (tmp_path / f"{TEMP_PREFIX}1.x.npz.abc").touch()  # the tool's own temporary file: not an input, not named
    files, others = npz_inputs(tmp_path)
    assert [p.name for p in files] == ["2DBox_US_a.npz"] and [p.name for p in others] == ["notes.txt", "old_run"]
    assert capsys.readouterr().err == f"skipped 2 non-npz file(s): {tmp_path / 'notes.txt'}, {tmp_path / 'old_run'}\n"
    with pytest.raises(CaseError, match="no such directory"):
        npz_inputs(tmp_path / "absent")
