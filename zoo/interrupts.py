"""Ctrl-C in the commands: always a stop, one line on stderr, exit code 130, only whole files left.

A command process (`python -m zoo.predict ...`, or any module of this project's packages run with -m) goes through
three phases, and SIGINT ends each:
- start-up, the imports (seconds of torch, timm, OpenVINO on a busy machine): nothing is written yet, so SIGINT ends
  the process at once (one line, exit 130) instead of printing a KeyboardInterrupt traceback from inside an import;
- the run (inside zoo.cli.run_cli / run_main): SIGINT raises KeyboardInterrupt as usual; the command keeps what it
  finished (reports of the cases done, its temporary files removed) and the runner prints one line, exit 130;
- after the run (interpreter shutdown): as at start-up.

A SIGINT that the process inherited as ignored is taken back. POSIX has the background jobs of a non-interactive
shell (`pytest ... &` in a CI script) ignore SIGINT, every process they start inherits that, and Python keeps it: a
zoo.predict started from such a test run ignored the SIGINT it was sent and ran on through every case (the
`test_sigint_...` time-out of issue #33). A command of this project always stops on SIGINT.

Only a command process is touched (the module Python was asked to run, sys.orig_argv's `-m MODULE`, is one of this
project's): importing zoo in a test, a notebook or a server leaves its signal handling as it was.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PACKAGES = ("zoo", "benchmarks", "distill", "compress")
LINE = "interrupted: every file written so far is complete"


def interrupted_line() -> None:
    """The one line a command prints on Ctrl-C (stdout flushed first, so the lines keep their order)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: the line is still tried
            pass
    try:
        print(LINE, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _exit_at_once(signum, frame) -> None:
    """SIGINT outside a command's run: nothing of the run is being written, so end now."""
    interrupted_line()
    os._exit(130)


def command_module(argv: list[str] | None = None) -> str | None:
    """The module of `python [options] -m MODULE ...` (sys.orig_argv), else None (a script, -c, the REPL)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg in ("-X", "-W"):  # options that take a value
            i += 2
            continue
        if arg in ("-c", "-") or not arg.startswith("-"):
            return None
        i += 1
    return None


def guard_startup() -> None:
    """Called when a package of this project is imported: in a command process, SIGINT ends the start-up at once
    (see the module docstring); elsewhere nothing changes."""
    module = command_module()
    if module and module.split(".")[0] in PACKAGES:
        become_command()


def become_command() -> None:
    """Handle SIGINT as a command process does (from the main thread): what guard_startup does for `python -m`, for
    a process that runs a command's main() otherwise (a test's forked child)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_once)


def in_command() -> bool:
    return signal.getsignal(signal.SIGINT) is _exit_at_once


@contextmanager
def raising() -> Iterator[None]:
    """A command's run: SIGINT raises KeyboardInterrupt, for the command to keep what it finished; outside the
    block (and in a process that is not a command, always) nothing changes."""
    if not (in_command() and threading.current_thread() is threading.main_thread()):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _exit_at_once)
