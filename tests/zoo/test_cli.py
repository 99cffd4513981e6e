from argparse import Namespace

from zoo.checkpoint import CheckpointError
from zoo.cli import run_cli
from zoo.io import CaseError


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


def test_ctrl_c_ends_with_one_line_and_exit_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_cli(interrupted, Namespace()) == 130
    assert capsys.readouterr().err == "interrupted: every file written so far is complete\n"


def test_commands_outside_run_cli_end_ctrl_c_the_same_way(tmp_path, monkeypatch, capsys):
    """benchmarks.evaluate (its __main__ goes through run_main) interrupted while scoring: one line, exit 130."""
    import numpy as np

    import benchmarks.evaluate
    from tests.conftest import write_npz
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
