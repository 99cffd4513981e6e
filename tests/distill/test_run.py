import subprocess
import sys

import numpy as np
import pytest

from distill.run import main
from tests.conftest import REPO, write_npz
from tests.zoo.test_teachers import small_sam_checkpoint
from zoo.checkpoint import load_checkpoint
from zoo.io import load_case
from zoo.predict import ModalityChoice, segment_case


@pytest.fixture
def small_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        write_npz(data / f"2DBox_US_{i}.npz", imgs=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                  boxes=np.array([[5, 5, 40, 30]]))
    return data


def test_medsam_teacher_path_end_to_end(small_data, tmp_path, capsys):
    small_sam_checkpoint(tmp_path / "medsam_small.pth")
    args = ["--teacher", "medsam", "--teacher-checkpoint", str(tmp_path / "medsam_small.pth"), "--student", "fast",
            "--data", str(small_data), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "1", "--batch-size", "2", "--threads", "1"]
    assert main(args) == 0
    assert "4 computed" in capsys.readouterr().out
    model, meta = load_checkpoint(tmp_path / "out" / "student.pt")
    assert meta["stage"] == "distill" and meta["teacher"] == "medsam" and meta["steps"] == 2
    case = load_case(small_data / "2DBox_US_0.npz")
    assert segment_case(model, case, ModalityChoice(model)).segs.shape == (48, 64)
    # a second run finds every teacher embedding cached
    assert main(args + ["--out", str(tmp_path / "out2")]) == 0
    assert "4 hits, 0 computed" in capsys.readouterr().out


def test_clear_errors_for_bad_inputs(small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEDSAM_CHECKPOINT", raising=False)
    assert main(["--teacher", "medsam", "--data", str(small_data)]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err
    assert main(["--teacher", "medsam", "--teacher-checkpoint", str(tmp_path / "nope.pth"), "--data", str(small_data)]) == 2
    assert "nope.pth: medsam teacher checkpoint not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--teacher", "litemedsam", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main(common + ["--data", str(empty)]) == 2
    assert "no .npz files" in capsys.readouterr().err
    (small_data / "2DBox_US_9.npz").write_bytes(b"not an npz at all")
    assert main(common + ["--data", str(small_data)]) == 2
    assert "2DBox_US_9.npz: not a readable npz" in capsys.readouterr().err


def test_ddp_two_cpu_processes(small_data, tmp_path):
    small_sam_checkpoint(tmp_path / "sam_small.pth")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.run",
               "--teacher", "sam", "--teacher-checkpoint", str(tmp_path / "sam_small.pth"), "--student", "fast",
               "--data", str(small_data), "--out", str(tmp_path / "ddp"), "--cache-dir", str(tmp_path / "cache"),
               "--epochs", "1", "--batch-size", "2", "--threads", "1", "--device", "cpu"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    _, meta = load_checkpoint(tmp_path / "ddp" / "student.pt")
    assert meta["steps"] == 1  # 4 samples over 2 ranks in batches of 2: one step, 4 images
    log = (tmp_path / "ddp" / "log.csv").read_text().splitlines()
    assert len(log) == 2
