"""The command line a benchmark records beside its table, quoted so that it pastes back into a shell.

Joining ``sys.argv`` with spaces loses what the shell's quotes held: an empty value (``--untouched ''``) vanished
and the next flag became its value, and a ``*`` or ``{lang}`` pattern could expand when pasted. Each argument is
quoted with :func:`shlex.quote` only where a shell needs it, so ordinary commands read as typed.
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Sequence


def recorded(script: str, argv: Sequence[str] | None = None, drop: Iterable[str] = ()) -> str:
    """``python benchmarks/<script> <args>``: ``argv`` (default ``sys.argv[1:]``) quoted for a POSIX shell.

    Args:
        script: the benchmark's file name (``Path(__file__).name``).
        argv: the arguments as the script's ``main`` received them; None reads ``sys.argv[1:]``.
        drop: flags left out of the record (``--table-only``: it rewrites the table, it measures nothing).
    """
    skip = set(drop)
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in skip]
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def recorded_option(command: str, flag: str, default: str | None = None) -> str | None:
    """The value ``flag`` had in a recorded ``command`` (the last one given, as argparse reads it), else
    ``default``: what a results file's run used, read back from the line :func:`recorded` wrote."""
    argv = shlex.split(command)
    value = default
    for name, given in zip(argv, argv[1:]):
        if name == flag:
            value = given
    return value
