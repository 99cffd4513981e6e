"""What every `python -m ...` command shares: the runner that reports bad input and exits the same way, the default
output folder, and command-line options generated from a settings dataclass (declared once, with their defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from zoo import interrupts
from zoo.data.io import CaseError, interrupted_by
from zoo.models.weights import CheckpointError

# Where commands write by default: relative to the working directory, as an installed package has no repository.
RUNS_DIR = Path("runs")


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Bad input that stops a run (a missing or unreadable file, a refused output, a bad option value): exit code 2, one
# line. Library functions raise these; only the command runners below turn them into exit codes.
USAGE_ERRORS = (CheckpointError, CaseError, ValueError, FileExistsError)


def run_cli(run_fn, args) -> int:
    """Exit code 0; 1 when input files were skipped (each reported on its own line as it was found: the run used
    the others); 2 with one line naming the file and the problem for bad input that stops the run; 130 with one
    line on Ctrl-C (files are written whole or not at all, so what was written is usable: training resumes).

    `run_fn(args)` appends what it skipped to `args.skipped`. ValueError covers the data errors of the stages above
    zoo (zoo.data.samples.DataError is one). An error raised while an interrupt was being handled is the interrupt
    (zoo.data.io.interrupted_by); SIGINT always raises KeyboardInterrupt during the run (zoo.interrupts)."""
    args.skipped = []

    def run() -> int:
        run_fn(args)  # what it returns is its result, not an exit code
        return 0

    code = run_main(run)
    if code:
        return code
    if args.skipped:
        print(f"{len(args.skipped)} input file(s) could not be used and were skipped", file=sys.stderr)
        return 1
    return 0


def option(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, **metadata):
    """A settings dataclass field that is also a command-line option: `help`, and optionally `choices`, `flag` (the
    option's name when it is not --field-name, e.g. '--no-flip' for a bool that defaults to True) or `type` (the
    argparse type when it is not the field's, e.g. positive_int)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **metadata})


def redefault(cls, name: str, default):
    """Field `name` of dataclass `cls` with another default (a stage's own), keeping its help and choices."""
    return dataclasses.field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def _option_type(hint):
    """(type, nargs): int for `int` and `int | None`; (Path, '+') for `list[Path]`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], "+"
    return hint, None


def add_settings_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the settings dataclass `cls` that has a default (fields without one, and those in
    `skip`, are the command's own): --field-name, its type and default from the field, its help from the field's
    metadata. A bool field is a switch that turns its default around."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind, nargs = _option_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                                help=f.metadata.get("help"))
        else:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            parser.add_argument(flag, dest=f.name, type=f.metadata.get("type", kind), nargs=nargs, default=default,
                                choices=f.metadata.get("choices"),
                                help=f"{f.metadata.get('help', '')} (default: {shown})".lstrip())


def settings_from_args(cls, args: argparse.Namespace, **given):
    """An instance of the settings dataclass `cls` from parsed options (see add_settings_options) and `given`
    values; fields with neither keep their default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})
def interrupted() -> int:
    """Ctrl-C: one line instead of a traceback, and the shell's exit code for SIGINT."""
    interrupts.interrupted_line()
    return 130


def run_main(main) -> int:
    """`main()` of a command that returns its own exit code (run_cli's runner too): bad input ends with exit 2 and
    one line, Ctrl-C as interrupted() does."""
    try:
        with interrupts.raising():
            return main()
    except KeyboardInterrupt:
        return interrupted()
    except USAGE_ERRORS as err:
        if interrupted_by(err):
            return interrupted()
        print(f"error: {err}", file=sys.stderr)
        return 2
