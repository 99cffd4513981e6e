"""The shared command runner: every `python -m ...` command reports bad input and exits the same way."""

from __future__ import annotations

import sys
from pathlib import Path

from zoo.checkpoint import CheckpointError
from zoo.io import CaseError

# Where commands write by default: relative to the working directory, as an installed package has no repository.
RUNS_DIR = Path("runs")


def run_cli(run_fn, args) -> int:
    """Exit code 0; 1 when input files were skipped (each reported on its own line as it was found: the run used
    the others); 2 with one line naming the file and the problem for bad input that stops the run.

    `run_fn(args)` appends what it skipped to `args.skipped`. ValueError covers the data errors of the stages above
    zoo (distill.data.DataError is one)."""
    args.skipped = []
    try:
        run_fn(args)
    except (CheckpointError, CaseError, ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.skipped:
        print(f"{len(args.skipped)} input file(s) could not be used and were skipped", file=sys.stderr)
        return 1
    return 0
