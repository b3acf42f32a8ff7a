"""The project's home directory: imported bases (`bases/`), the expert registry (`registry/`) and downloads.

Resolution order: an explicit path, then ``WHISPER_EXPERTS_HOME``, then ``$XDG_CACHE_HOME/whisper-experts``
(``~/.cache/whisper-experts`` by default).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV_VAR = "WHISPER_EXPERTS_HOME"


def home_dir(override: str | os.PathLike | None = None) -> Path:
    """The home directory (not created)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "whisper-experts"


def bases_dir(home: str | os.PathLike | None = None) -> Path:
    """Where imported base models live: ``<home>/bases/<name>/`` (Hugging Face directories)."""
    return home_dir(home) / "bases"


def ensure_writable(directory: Path, what: str, hint: str | None = None) -> Path:
    """Create ``directory`` if needed and check it can be written, with an error that says how to fix it.

    Args:
        directory: the directory to create/check.
        what: what will be written there, for the message.
        hint: how to choose another location (default: the home directory's env var / flag).
    """
    for part in (directory, *directory.parents):
        if part.is_symlink() and not part.exists():  # mkdir would only say "File exists"
            raise PermissionError(
                f"cannot write {what} to {directory}: {part} is a symbolic link to {os.readlink(part)}, which "
                f"does not exist; create that directory, remove the link, or "
                f"{hint or f'choose another location (set {ENV_VAR} or pass --home)'}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # mkstemp creates a new file with O_EXCL under a random name: it never opens (let alone empties) a
        # file or symlink someone planted at a predictable probe name.
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            f"cannot write {what} to {directory} ({e.strerror or e}); "
            f"{hint or f'choose another location (set {ENV_VAR} or pass --home)'} "
            "or fix its permissions / free disk space"
        ) from e
    return directory
