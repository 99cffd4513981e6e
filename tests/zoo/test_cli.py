from argparse import Namespace
from pathlib import Path

import pytest

from zoo.cli import run_cli
from zoo.data.io import CaseError
from zoo.models.weights import CheckpointError


def test_exit_codes_and_one_line_per_problem(capsys):
    def ok(args):
        pass

    def skips(args):
        args.skipped.append("a.npz")

    def fails(args):
        raise CheckpointError("model.pt: not a checkpoint")

    assert run_cli(ok, Namespace()) == 0
    assert run_cli(skips, Namespace()) == 1
    assert "1 input file(s) could not be used" in capsys.readouterr().err
    assert run_cli(fails, Namespace()) == 2
    assert capsys.readouterr().err == "error: model.pt: not a checkpoint\n"


def test_bad_case_and_value_errors_stop_with_exit_2(capsys, tmp_path):
    def bad_case(args):
        raise CaseError(tmp_path / "x.npz", "no 'imgs' array")

    def bad_value(args):
        raise ValueError("fraction for 'CT' must be in (0, 1], got 2")

    assert run_cli(bad_case, Namespace()) == 2
    assert "x.npz" in capsys.readouterr().err
    assert run_cli(bad_value, Namespace()) == 2


@pytest.mark.parametrize("command, settings_cls, required", [
    ("distill.run", "distill.train:TrainSettings", []),
    ("distill.finetune", "distill.finetune:FinetuneSettings", []),
    ("compress.prune", "compress.prune:PruneSettings", ["model.pt"]),
])
def test_training_options_come_from_the_settings_dataclass(command, settings_cls, required):
    """Every training command's options are its settings' fields, with the defaults declared there and nowhere
    else; the flag names the README and older runs use keep working."""
    import dataclasses
    import importlib

    from zoo.cli import settings_from_args

    parse_args = importlib.import_module(command).parse_args
    module, name = settings_cls.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert settings_from_args(cls, parse_args(required), out_dir=Path("o")) == cls(out_dir=Path("o"))
    args = parse_args(required + ["--lr", "0.5", "--max-steps", "3", "--no-flip", "--no-balance", "--epochs", "2",
                                  "--scheduler", "cosine", "--batch-size", "4", "--checkpoint-every", "7"])
    settings = settings_from_args(cls, args, out_dir=Path("o"))
    assert (settings.lr, settings.max_steps, settings.flip, settings.balanced, settings.epochs, settings.scheduler,
            settings.batch_size, settings.checkpoint_every) == (0.5, 3, False, False, 2, "cosine", 4, 7)
    names = {f.name for f in dataclasses.fields(cls)} - {"out_dir"}
    from distill.finetune import NOT_OPTIONS  # the distillation-only fields, which fine-tuning leaves out

    assert names <= set(vars(parse_args(required))) | set(NOT_OPTIONS)
    with pytest.raises(SystemExit):
        parse_args(required + ["--scheduler", "linear"])


def test_finetune_keeps_its_own_defaults_and_switches():
    from distill.finetune import parse_args

    args = parse_args(["--train-encoder", "--box-jitter", "2"])
    assert args.train_encoder and args.box_jitter == 2 and args.lr == 1e-4 and args.scheduler == "cosine"
    assert not hasattr(args, "mask_loss_weight")  # distillation's mask loss is not a fine-tuning option
def test_ctrl_c_ends_with_one_line_and_exit_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_cli(interrupted, Namespace()) == 130
    assert capsys.readouterr().err == "interrupted: every file written so far is complete\n"


def test_commands_outside_run_cli_end_ctrl_c_the_same_way(tmp_path, monkeypatch, capsys):
    """benchmarks.evaluate (its __main__ goes through run_main) interrupted while scoring: one line, exit 130."""
    import numpy as np

    import benchmarks.evaluate
    from tests.helpers import write_npz
    from zoo.cli import run_main

    for folder in ("segs", "gts"):
        (tmp_path / folder).mkdir()
    write_npz(tmp_path / "gts" / "2DBox_US_a.npz", gts=np.ones((4, 4), np.uint8))
    write_npz(tmp_path / "segs" / "2DBox_US_a.npz", segs=np.ones((4, 4), np.uint8))

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmarks.evaluate, "score_file", ctrl_c)
    argv = ["--segs", str(tmp_path / "segs"), "--gts", str(tmp_path / "gts"), "--out", str(tmp_path / "m.csv")]
    assert run_main(lambda: benchmarks.evaluate.main(argv)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: every file written so far is complete"


def test_an_error_raised_while_ctrl_c_was_handled_ends_as_ctrl_c(capsys):
    """Ctrl-C inside zipfile's close surfaced as ValueError: it was reported as bad input with exit 2."""
    def interrupted_mid_write(args):
        try:
            raise KeyboardInterrupt
        finally:
            raise ValueError("Can't close the ZIP file while there is an open writing handle on it")

    assert run_cli(interrupted_mid_write, Namespace()) == 130
    assert capsys.readouterr().err == "interrupted: every file written so far is complete\n"


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "zoo.predict", "-i", "x"], "zoo.predict"),
    (["python", "-X", "faulthandler", "-u", "-m", "benchmarks.run"], "benchmarks.run"),
    (["python", "-mzoo.segment"], "zoo.segment"),
    (["python", "script.py", "-m", "zoo.predict"], None),
    (["python", "-c", "import zoo", "-m"], None),
    (["python"], None),
])
def test_only_a_command_process_gets_the_command_s_ctrl_c_handling(argv, module):
    import signal

    from zoo import interrupts

    assert interrupts.command_module(argv) == module
    assert not interrupts.in_command()  # pytest imported zoo: its own SIGINT handling is left alone
    with interrupts.raising():
        assert signal.getsignal(signal.SIGINT) is not interrupts._exit_at_once
