"""The shared command runner: every `python -m ...` command reports bad input and exits the same way."""

from __future__ import annotations

import argparse
import sys

from zoo.checkpoint import CheckpointError
from zoo.io import CaseError


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_cli(run_fn, args) -> int:
    """Exit code 0; 1 when input files were skipped (each reported on its own line as it was found: the run used
    the others); 2 with one line naming the file and the problem for bad input that stops the run; 130 with one
    line on Ctrl-C (files are written whole or not at all, so what was written is usable: training resumes).

    `run_fn(args)` appends what it skipped to `args.skipped`. ValueError covers the data errors of the stages above
    zoo (distill.data.DataError is one)."""
    args.skipped = []
    try:
        run_fn(args)
    except (CheckpointError, CaseError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    if args.skipped:
        print(f"{len(args.skipped)} input file(s) could not be used and were skipped", file=sys.stderr)
        return 1
    return 0


def interrupted() -> int:
    """Ctrl-C: one line instead of a traceback, and the shell's exit code for SIGINT."""
    print("interrupted: every file written so far is complete", file=sys.stderr)
    return 130


def run_main(main) -> int:
    """`main()` of a command that does not go through run_cli, with Ctrl-C ending as interrupted() does."""
    try:
        return main()
    except KeyboardInterrupt:
        return interrupted()
