import subprocess
import sys

import numpy as np
import pytest

from distill.run import main
from tests.helpers import REPO, small_sam_checkpoint, write_npz
from zoo.data.io import load_case, read_csv
from zoo.models.checkpoint import load_checkpoint
from zoo.models.weights import CheckpointError
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


@pytest.mark.slow  # two training processes (35 s); CI's 20 minutes keep the single-process resume tests
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


def test_bad_input_corpus(tmp_path, capsys):
    from tests.helpers import assert_reported, write_corpus

    bad, good = write_corpus(tmp_path / "data")
    small_sam_checkpoint(tmp_path / "medsam_small.pth")
    code = main(["--teacher", "medsam", "--teacher-checkpoint", str(tmp_path / "medsam_small.pth"), "--student", "fast",
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                 "--max-steps", "1", "--batch-size", "2", "--threads", "1"])
    assert code == 1  # trained on the usable files, and says that some were not
    assert_reported(capsys.readouterr().err, bad)
    _, meta = load_checkpoint(tmp_path / "out" / "student.pt")
    assert meta["samples"] == 5 + 3  # five 2D images and slices 0, 5, 10 of the volume


@pytest.mark.slow  # three training runs in subprocesses (70 s); tests/distill/test_train.py checks resume in CI
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(small_data, tmp_path):
    import os
    import random
    import signal
    import time

    import torch

    small_sam_checkpoint(tmp_path / "medsam_small.pth")
    command = [sys.executable, "-m", "distill.run", "--teacher", "medsam", "--teacher-checkpoint",
               str(tmp_path / "medsam_small.pth"), "--student", "fast", "--data", str(small_data), "--cache-dir",
               str(tmp_path / "cache"), "--epochs", "3", "--batch-size", "2", "--checkpoint-every", "1", "--threads", "1"]
    subprocess.run(command + ["--out", str(tmp_path / "whole")], cwd=REPO, check=True, capture_output=True)

    kill_after = random.Random(os.getpid()).randint(1, 4)  # a random step of the 6, seeded per test run
    log = tmp_path / "killed" / "log.csv"
    process = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (log.exists() and len(log.read_text().splitlines()) > kill_after):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "student.pt").exists(), "the run finished before it could be killed"
    subprocess.run(command + ["--out", str(tmp_path / "killed"), "--resume"], cwd=REPO, check=True, capture_output=True)

    def losses(folder):
        return [(row["step"], float(row["loss"])) for row in read_csv(folder / "log.csv")]

    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # same steps, same loss at each (incl. the next)
    whole = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "killed" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_student_from_a_trained_model_with_another_models_decoder(tmp_path):
    """--init copies the encoder weights that fit (the new high-resolution path stays zero, so the student starts
    as the model it came from); --decoder-from brings a fine-tuned decoder and its class-prompt parts."""
    import torch

    from distill.run import build_student
    from zoo.models.checkpoint import save_checkpoint
    from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
    from zoo.models.encoders import ENCODER_CONFIGS

    torch.manual_seed(0)
    trained = ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS["fast"])).eval()
    finetuned = ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS["fast"], class_prompt=True)).eval()
    torch.nn.init.normal_(finetuned.class_prompt.weight)
    save_checkpoint(tmp_path / "trained.pt", trained)
    save_checkpoint(tmp_path / "finetuned.pt", finetuned)
    student = build_student("fast_hr", str(tmp_path / "trained.pt"), str(tmp_path / "finetuned.pt")).eval()
    assert student.has_modality_head and student.image_encoder.fusion is not None
    image, box = torch.rand(1, 3, 256, 256), torch.tensor([[20.0, 30.0, 140.0, 160.0]])
    with torch.no_grad():
        embedding = student.embed(image)
        assert torch.equal(embedding, trained.embed(image))
        assert torch.equal(student.decode(embedding, box, 3), finetuned.decode(embedding, box, 3))
    # a light decoder comes as it is: the student's masks are the ones that model's decoder gives
    light = ClassPromptSAM(ModelConfig(encoder=ENCODER_CONFIGS["fast"], class_prompt=True, decoder_token_stride=4)).eval()
    light.load_state_dict(finetuned.state_dict())
    save_checkpoint(tmp_path / "light.pt", light)
    student = build_student("fast_hr", str(tmp_path / "trained.pt"), str(tmp_path / "light.pt")).eval()
    assert student.config.decoder_token_stride == 4
    with torch.no_grad():
        assert torch.equal(student.decode(embedding, box, 3), light.decode(embedding, box, 3))
    with pytest.raises(CheckpointError, match="missing.pt"):
        build_student("fast_hr", str(tmp_path / "missing.pt"))


def test_out_is_never_an_input(small_data, tmp_path, capsys):
    small_sam_checkpoint(tmp_path / "medsam_small.pth")
    before = sorted(p.name for p in small_data.iterdir())
    common = ["--teacher", "medsam", "--teacher-checkpoint", str(tmp_path / "medsam_small.pth"), "--data",
              str(small_data), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "1"]
    for out in (small_data, tmp_path):  # the data folder; the folder holding the teacher checkpoint
        assert main(common + ["--out", str(out)]) == 2
        assert "--out is the" in capsys.readouterr().err
    assert sorted(p.name for p in small_data.iterdir()) == before and not (tmp_path / "last.pt").exists()
