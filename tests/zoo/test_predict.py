import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, assert_refused, write_npz
from zoo.data.io import Case, load_case, read_csv, save_npz_atomic
from zoo.modalities import MODALITIES
from zoo.predict import ModalityChoice, SliceEmbeddings, main, propagation_plan, segment_case


def volume_case(volume, boxes, name="3DBox_CT_synthetic.npz"):
    return Case(path=Path(name), image=volume, boxes=np.asarray(boxes, float), gts=None,
                spacing=np.ones(3), modality="CT")


def test_propagation_plan_follows_the_official_ranges():
    (middle, up, down), = propagation_plan(np.array([[0, 0, 3, 9, 9, 9]]), depth=12)
    assert middle == 6 and list(up) == [6, 7, 8, 9] and list(down) == [5, 4, 3]
    (middle, up, down), = propagation_plan(np.array([[0, 0, 0, 9, 9, 4]]), depth=5)
    assert middle == 2 and list(up) == [2, 3, 4] and list(down) == [1]  # slice 0 is never reached, as officially


def test_slanted_tube_is_followed_beyond_its_box_and_each_slice_is_embedded_once(bright_runtime):
    """A bright tube drifting 2 px per slice leaves the original box; propagation with the carried box follows it."""
    volume = np.zeros((20, 256, 256), np.uint8)
    for z in range(2, 18):
        x = 100 + 2 * (z - 10)
        volume[z, 100:120, x : x + 20] = 255
    boxes = [[98, 100, 2, 117, 119, 17],  # the tube's box on the middle slice (9), spanning every slice
             [150, 150, 5, 160, 160, 12]]  # an empty box: segments nothing
    result = segment_case(bright_runtime, volume_case(volume, boxes), ModalityChoice(bright_runtime))
    assert np.array_equal(result.segs == 1, volume > 0)
    assert not (result.segs == 2).any()
    assert bright_runtime.embed_calls == len(range(2, 18))  # slices 2..17, once each for both boxes
    assert result.modality is None and result.modality_source == "unused"


def test_later_box_wins_where_masks_overlap(bright_runtime):
    volume = np.zeros((6, 64, 64), np.uint8)
    volume[1:5, 10:40, 10:40] = 200
    case = volume_case(volume, [[10, 10, 1, 39, 39, 4], [20, 20, 1, 39, 39, 4]])
    segs = segment_case(bright_runtime, case, ModalityChoice(bright_runtime)).segs
    assert (segs[2, 25, 25], segs[2, 12, 12]) == (2, 1)


def test_embedding_cache_respects_its_budget(bright_runtime):
    volume = np.zeros((10, 32, 32), np.uint8)
    cache = SliceEmbeddings(bright_runtime, volume, budget_bytes=3 * 3 * 256 * 256 * 4)
    for z in range(10):
        cache[z]
    assert list(cache.cache) == [7, 8, 9] and cache.computed == 10
    cache[9]
    assert cache.computed == 10


def test_2d_labels_follow_box_order(bright_runtime, tmp_path):
    image = np.zeros((128, 128, 3), np.uint8)
    image[10:60, 10:60] = 255
    path = write_npz(tmp_path / "2DBox_US_x.npz", imgs=image, boxes=np.array([[10, 10, 59, 59], [30, 30, 59, 59]]))
    segs = segment_case(bright_runtime, load_case(path), ModalityChoice(bright_runtime)).segs
    assert segs[20, 20] == 1 and segs[40, 40] == 2 and segs[80, 80] == 0


def grid_of_objects(n: int, depth: int | None = None):
    """An image (or volume of `depth` slices) with n bright 6×6 squares on a grid of 10-px cells, and a box per cell."""
    rows, cols = -(-n // 20), 20
    image = np.zeros((rows * 10, cols * 10), np.uint8)
    boxes = []
    for i in range(n):
        y, x = divmod(i, cols)
        image[10 * y + 2 : 10 * y + 8, 10 * x + 2 : 10 * x + 8] = 255
        boxes.append([10 * x, 10 * y, 10 * x + 9, 10 * y + 9])
    if depth is None:
        return image, np.array(boxes)
    return np.repeat(image[None], depth, axis=0), np.array([[x0, y0, 0, x1, y1, depth - 1] for x0, y0, x1, y1 in boxes])


@pytest.mark.parametrize("depth", [None, 3])
def test_300_boxes_get_uint16_labels_1_to_300(bright_runtime, tmp_path, depth):
    image, boxes = grid_of_objects(300, depth)
    path = write_npz(tmp_path / "2DBox_US_many.npz", imgs=image, boxes=boxes)
    segs = segment_case(bright_runtime, load_case(path), ModalityChoice(bright_runtime)).segs
    assert segs.dtype == np.uint16
    # as zoo.predict writes it (the CLI's corpus test leaves this case out: minutes of SAM's decoder)
    assert np.load(save_npz_atomic(tmp_path / "out" / path.name, segs=segs))["segs"].dtype == np.uint16
    assert set(np.unique(segs)) == set(range(301))
    # row 1, column 1: the 22nd box (on every slice but 0, which propagation never reaches, as officially)
    assert (segs[..., 14:16, 14:16] == 22).all() if depth is None else (segs[1:, 14:16, 14:16] == 22).all()
    few, few_boxes = grid_of_objects(255)
    few_path = write_npz(tmp_path / "2DBox_US_few.npz", imgs=few, boxes=few_boxes)
    assert segment_case(bright_runtime, load_case(few_path), ModalityChoice(bright_runtime)).segs.dtype == np.uint8


def test_cli_segments_good_files_reports_bad_ones_and_fails_at_the_end(val_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = val_dir / "2DBox_Dermoscopy_PH2_IMD002.npz"
    (inputs / good.name).write_bytes(good.read_bytes())
    write_npz(inputs / "2DBox_CT_bad.npz", imgs=np.zeros((8, 8), np.float32), boxes=np.array([[1, 1, 4, 4]]))
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    code = main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--model", "litemedsam"])
    assert code == 1
    assert "2DBox_CT_bad.npz: imgs has dtype float32" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [good.name, "timing.csv"]
    rows = {r["case"]: r for r in read_csv(tmp_path / "out" / "timing.csv")}
    assert rows[good.name]["status"] == "ok" and float(rows[good.name]["seconds"]) > 0
    assert rows["2DBox_CT_bad.npz"]["status"] == "failed"
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # inputs untouched
    assert_refused(main(["-i", str(inputs), "-o", str(inputs)]), capsys, "-o/--output is the input")


def dsc(a, b):
    labels = range(1, max(a.max(), b.max()) + 1)
    return np.mean([2 * ((a == l) & (b == l)).sum() / max((a == l).sum() + (b == l).sum(), 1) for l in labels])


@pytest.mark.parametrize("name", [
    "2DBox_Microscopy_DSB2018_03f583ec5018739f.npz",
    "2DBox_Mammography_DDSMtissue_A0002-RIGHTMLO.npz",
    pytest.param("3DBox_PET_IBSISTS_STS001.npz", marks=pytest.mark.slow),  # a whole volume through LiteMedSAM
])
def test_litemedsam_reproduces_the_official_masks(litemedsam, val_dir, reference_dir, name):
    ours = segment_case(litemedsam, load_case(val_dir / name), ModalityChoice(litemedsam)).segs
    official = np.load(reference_dir / name)["segs"]
    assert dsc(ours, official) >= 0.99


def test_large_volume_stays_under_the_memory_limit(tmp_path):
    """300×512×512 with 10 boxes: peak RSS of the whole process below 2.5 GB (boxes span few slices to keep it fast)."""
    script = textwrap.dedent("""
        import numpy as np, torch
        from pathlib import Path
        from zoo.models.factory import build_litemedsam
        from zoo.data.io import Case
        from zoo.predict import ModalityChoice, segment_case
        rng = np.random.default_rng(0)
        volume = rng.integers(0, 255, (300, 512, 512), dtype=np.uint8)
        boxes = np.array([[40 * i, 30, 149, 40 * i + 100, 300, 151] for i in range(10)], float)
        model = build_litemedsam()
        case = Case(Path("3DBox_CT_big.npz"), volume, boxes, None, np.ones(3), "CT")
        segs = segment_case(model, case, ModalityChoice(model)).segs
        assert segs.shape == volume.shape
        # VmHWM is this process's own peak; ru_maxrss would also count the pre-exec peak of the forking pytest
        print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 2500, f"peak RSS {peak_mb:.0f} MB"


def test_class_prompt_model_says_which_modality_it_used(tmp_path):
    from tests.helpers import tiny_model
    from zoo.models.checkpoint import save_checkpoint

    model_path = save_checkpoint(tmp_path / "cp.pt", tiny_model())
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for name in ("no_modality_here.npz", "2DBox_OCT_unseen.npz", "2DBox_US_x.npz"):
        write_npz(inputs / name, imgs=image, boxes=np.array([[5, 5, 30, 30]]))
    assert main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--model", str(model_path), "--threads", "1"]) == 0
    rows = {r["case"]: r for r in read_csv(tmp_path / "out" / "timing.csv")}
    assert rows["no_modality_here.npz"]["modality_source"] == "head"
    assert rows["no_modality_here.npz"]["modality"] in MODALITIES
    assert (rows["2DBox_OCT_unseen.npz"]["modality"], rows["2DBox_OCT_unseen.npz"]["modality_source"]) == ("OCT", "file")
    assert main(["-i", str(inputs), "-o", str(tmp_path / "out2"), "--model", str(model_path), "--modality", "head"]) == 0
    head_rows = {r["case"]: r for r in read_csv(tmp_path / "out2" / "timing.csv")}
    assert {r["modality_source"] for r in head_rows.values()} == {"head"}
    # the head's own guess is reported even where the file named the modality
    assert rows["2DBox_OCT_unseen.npz"]["head_modality"] == head_rows["2DBox_OCT_unseen.npz"]["modality"] in MODALITIES


def test_bad_input_corpus(tmp_path, capsys):
    from tests.helpers import NOT_NPZ, assert_reported, tiny_model, write_corpus
    from zoo.models.checkpoint import save_checkpoint

    bad, good = write_corpus(tmp_path / "in", many_boxes=False)  # (test_300_boxes_... above)
    model = str(save_checkpoint(tmp_path / "tiny.pt", tiny_model()))
    out = tmp_path / "out"
    assert main(["-i", str(tmp_path / "in"), "-o", str(out), "--model", model, "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert_reported(captured.err, bad)
    assert sorted(p.name for p in out.iterdir()) == sorted(good + ["timing.csv"])  # no partial or temporary file
    rows = {r["case"]: r["status"] for r in read_csv(out / "timing.csv")}
    assert rows == {**{name: "failed" for name in bad if name not in NOT_NPZ}, **{name: "ok" for name in good}}
    n_npz = len(bad) - len(NOT_NPZ) + len(good)
    assert f"segmented {len(good)} of {n_npz + len(NOT_NPZ)} files" in captured.out
    assert f"{len(NOT_NPZ)} not npz, not read" in captured.out
    assert np.load(out / "2DBox_US_one_pixel.npz")["segs"].shape == (1, 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = main(["-i", str(tmp_path / "in"), "-o", str(blocker / "out"), "--model", model])
    assert_refused(code, capsys, "output directory is not writable")
    (tmp_path / "empty").mkdir()
    code = main(["-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out2"), "--model", model])
    assert_refused(code, capsys, "no .npz files")


@pytest.fixture
def tiny_setup(tmp_path):
    """A tiny class-prompt checkpoint and an input folder of three small 2D cases."""
    from tests.helpers import tiny_model
    from zoo.models.checkpoint import save_checkpoint

    inputs = tmp_path / "in"
    inputs.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for i in range(3):
        write_npz(inputs / f"2DBox_US_{i}.npz", imgs=image, boxes=np.array([[5, 5, 30, 30]]))
    return str(save_checkpoint(tmp_path / "tiny.pt", tiny_model())), inputs


def test_no_output_is_ever_an_input(tiny_setup, tmp_path, capsys):
    model, inputs = tiny_setup
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    target = inputs / "2DBox_US_1.npz"
    for extra in (["--timing-csv", str(target)], ["--timing-csv", str(inputs)], ["-o", str(target)]):
        argv = ["-i", str(inputs), "-o", str(tmp_path / "out"), "--model", model] + extra
        assert_refused(main(argv), capsys, "is the input")
    # one file given: it is its own input too
    code = main(["-i", str(target), "-o", str(tmp_path / "out"), "--model", model, "--timing-csv", str(target)])
    assert_refused(code, capsys, "--timing-csv is the input")
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    assert not (tmp_path / "out").exists()


def test_write_errors_are_reported_per_file_and_the_run_goes_on(tiny_setup, tmp_path, capsys):
    model, inputs = tiny_setup
    out = tmp_path / "out"
    (out / "2DBox_US_1.npz").mkdir(parents=True)  # an output that cannot be replaced
    (out / "timing.csv").mkdir()
    assert main(["-i", str(inputs), "-o", str(out), "--model", model, "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert f"error: {out / '2DBox_US_1.npz'}: cannot be written" in err
    assert f"error: {out / 'timing.csv'}: cannot be written" in err
    assert "Traceback" not in err
    assert (out / "2DBox_US_0.npz").is_file() and (out / "2DBox_US_2.npz").is_file()


def test_stale_temporary_files_of_the_tool_are_removed_and_only_those(tiny_setup, tmp_path, capsys):
    import subprocess as sp

    from zoo.data.io import TEMP_PREFIX

    model, inputs = tiny_setup
    out = tmp_path / "out"
    out.mkdir()
    gone = sp.Popen(["true"])
    gone.wait()  # a process that has ended: its pid is free
    stale = out / f"{TEMP_PREFIX}{gone.pid}.2DBox_US_0.npz.x1y2z3"
    stale.touch()  # what a SIGKILL during a write leaves
    alive = out / f"{TEMP_PREFIX}{os.getppid()}.other.npz.abcdef"  # another running writer's: kept
    foreign = out / ".2DBox_US_0.npz.tmp"  # not this tool's naming: kept
    alive.touch(), foreign.touch()
    assert main(["-i", str(inputs), "-o", str(out), "--model", model, "--threads", "1"]) == 0
    assert not stale.exists() and alive.exists() and foreign.exists()
    assert str(stale) in capsys.readouterr().err


def test_sigint_ends_with_one_line_exit_130_and_the_timing_of_the_cases_done(tiny_setup, tmp_path):
    import signal
    import time

    model, inputs = tiny_setup
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for i in range(3, 400):
        write_npz(inputs / f"2DBox_US_{i}.npz", imgs=image, boxes=np.array([[5, 5, 30, 30]]))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "zoo.predict", "-i", str(inputs), "-o", str(out), "--model", model,
                             "--threads", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(list(out.glob("*.npz"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the interrupt"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = [line for line in stderr.splitlines() if "interrupted" in line]
    rows = read_csv(out / "timing.csv")
    done = sorted(p.name for p in out.glob("*.npz"))
    assert 2 <= len(rows) < 400 and sorted(r["case"] for r in rows if r["status"] == "ok") == done
    assert f"segmented {len(done)} of 400 files" in line
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_model_leaves_no_output_folder_and_threads_must_be_positive(tiny_setup, tmp_path, capsys):
    _, inputs = tiny_setup
    code = main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--model", "no_such_model"])
    assert_refused(code, capsys, "unknown model")
    assert not (tmp_path / "out").exists()
    for threads in ("-1", "0", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["-i", str(inputs), "-o", str(tmp_path / "out"), "--threads", threads])
        assert exit_info.value.code == 2
    assert "argument --threads: must be at least 1, got -1" in capsys.readouterr().err
