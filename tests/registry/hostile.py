"""Hostile conditions the registry tests build themselves, in a forked child of the test process.

Tests run as root, for whom every file is writable, so "another user on a read-only registry" is a child that
drops to ``nobody`` with ``os.setuid``; "a full disk" is a child under ``RLIMIT_FSIZE`` (writes past the limit
fail with EFBIG, as they would with ENOSPC); "too little memory" is a child under ``RLIMIT_AS``. The child is
forked, so it shares the modules the parent already imported: ``nobody`` cannot read the interpreter's own
library under /root, so everything a command imports lazily is imported before the fork (:func:`preload`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import tempfile
import traceback
from pathlib import Path

NOBODY = 65534


def preload() -> None:
    """Import what the registry and pack commands import lazily, so a child as ``nobody`` has it."""
    import fsspec.implementations.local  # noqa: F401
    import fsspec.implementations.memory  # noqa: F401
    import transformers.utils.logging  # noqa: F401

    import registry.base_integrity  # noqa: F401
    import registry.doctor  # noqa: F401
    import registry.integrity  # noqa: F401
    import registry.packs  # noqa: F401
    import registry.remote  # noqa: F401
    import trainers.cli.pack  # noqa: F401
    from trainers.cli import build_parser

    build_parser()


def in_child(fn, *, uid: int | None = None, fsize: int | None = None, extra_memory: int | None = None):
    """Run ``fn()`` in a forked child and return its (JSON-able) result.

    Args:
        uid: run as this user (and group) instead of root.
        fsize: the largest file offset the child may write (``RLIMIT_FSIZE``, bytes): a full disk.
        extra_memory: the address space the child may add to what it has (``RLIMIT_AS``, bytes).

    Raises:
        AssertionError: with the child's traceback, if ``fn`` raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        try:
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), like ENOSPC, not a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            if extra_memory is not None:
                limit = _address_space() + extra_memory
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            result = {"ok": fn()}
        except BaseException:
            result = {"error": traceback.format_exc()}
        try:
            with os.fdopen(write_end, "wb") as f:
                f.write(json.dumps(result, default=str).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data or b'{"error": "the child died without a result"}')
    if "error" in result:
        raise AssertionError("in the child:\n" + result["error"])
    return result["ok"]


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``whisper-experts ARGV`` run in this process, logging to stderr as a
    terminal user sees it (call it inside :func:`in_child`)."""
    from trainers.cli import main

    root = logging.getLogger()
    for handler in list(root.handlers):  # pytest's capture handlers: let the CLI configure logging itself
        root.removeHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def make_read_only(tree: Path) -> None:
    """Directories 0555 and files 0444 under ``tree`` (root ignores these; ``nobody`` does not)."""
    for directory, _, files in os.walk(tree):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)


@contextlib.contextmanager
def world_readable_dir():
    """A temporary directory ``nobody`` can enter (pytest's tmp_path lies under root's private 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="we-hostile-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
