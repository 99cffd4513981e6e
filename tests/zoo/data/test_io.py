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


def test_an_rgba_image_is_told_to_drop_its_alpha_not_given_a_hint_about_3d_boxes(tmp_path):
    rgba = write_npz(tmp_path / "2DBox_US_rgba.npz", imgs=np.zeros((40, 60, 4), np.uint8), boxes=np.array([[1, 2, 30, 20]]))
    with pytest.raises(CaseError) as caught:
        load_case(rgba)
    assert "4 channels: drop the alpha channel" in str(caught.value) and "6 columns" not in str(caught.value)


def test_stale_temporaries_and_staging_folders_of_dead_processes_are_removed_and_only_those(tmp_path):
    import os
    import subprocess

    from zoo.data.io import TEMP_PREFIX, clean_stale_temps

    gone = subprocess.Popen(["true"])
    gone.wait()
    staging = tmp_path / f"{TEMP_PREFIX}{gone.pid}.cp_tinyvit_fast_openvino-abc.x1y2"  # kill -9 during an export
    staging.mkdir()
    (staging / "encoder.onnx").write_bytes(b"\0" * 1000)
    stale_file = tmp_path / f"{TEMP_PREFIX}{gone.pid}.a.nii.gz.q1.tmp.nii.gz"
    stale_file.touch()
    live = tmp_path / f"{TEMP_PREFIX}{os.getppid()}.b.npz.w2"  # a running process's: kept
    live.mkdir()
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}.c.npz.e3"
    mine.touch()
    foreign = tmp_path / ".cp_tinyvit_fast_openvino.abc"  # not the toolkit's naming: kept
    foreign.mkdir()
    assert clean_stale_temps(tmp_path) == sorted([staging, stale_file])
    assert live.exists() and mine.exists() and foreign.exists()
    assert clean_stale_temps(tmp_path, own=True) == [mine]  # on an interrupt: this process's own too


def test_reports_of_two_processes_writing_at_once_keep_every_row(tmp_path):
    """merge_csv_atomic under the folder's lock: 2 processes × 25 merges, each of its own rows; none is lost (without
    the lock, a read-then-write of one run loses the rows the other wrote meanwhile)."""
    import os

    from zoo.data.io import merge_csv_atomic, read_csv

    report = tmp_path / "out" / "timing.csv"
    children = []
    for run in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for i in range(25):
                    merge_csv_atomic(report, [{"case": f"{run}{i}", "seconds": str(i)}], ["case", "seconds"], "case")
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0, 0]
    rows = read_csv(report)
    assert sorted(row["case"] for row in rows) == sorted(f"{run}{i}" for run in "ab" for i in range(25))
    merge_csv_atomic(report, [{"case": "a3", "seconds": "9.5"}], ["case", "seconds"], "case")  # a case redone
    rows = {row["case"]: row["seconds"] for row in read_csv(report)}
    assert len(rows) == 50 and rows["a3"] == "9.5"
    assert sorted(p.name for p in report.parent.iterdir()) == ["timing.csv"]  # the lock leaves nothing behind


def test_an_error_raised_while_an_interrupt_is_handled_is_the_interrupt(tmp_path):
    """Ctrl-C inside zipfile's close (numpy writing an npz) surfaced as ValueError('Can't close the ZIP file while
    there is an open writing handle'): reported as bad input, exit 2. It is a KeyboardInterrupt now, the temporary
    file removed."""
    from zoo.data.io import atomic_path, interrupted_by

    def close_fails_after_an_interrupt():
        try:
            raise KeyboardInterrupt
        finally:
            raise ValueError("Can't close the ZIP file while there is an open writing handle on it")

    with pytest.raises(ValueError) as caught:
        close_fails_after_an_interrupt()
    assert interrupted_by(caught.value) and not interrupted_by(ValueError("plain"))
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "case.npz"):
            close_fails_after_an_interrupt()
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_a_file_is_written_is_held_until_it_is_whole_and_in_place(tmp_path):
    import os
    import signal

    from zoo.data.io import atomic_path

    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "case.txt") as tmp:
            tmp.write_text("first half")
            os.kill(os.getpid(), signal.SIGINT)  # held: the write goes on
            tmp.write_text("first half, second half")
    assert [p.name for p in tmp_path.iterdir()] == ["case.txt"]  # finished, never half
    assert (tmp_path / "case.txt").read_text() == "first half, second half"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
