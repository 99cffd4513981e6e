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
