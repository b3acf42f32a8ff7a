"""Fetch Debian packages' files without installing them: ``apt-get download`` + ``dpkg-deb -x``, no root.

The real-speech sources (``fillets``: Fish Fillets NG voice acting; ``asterisk``: Asterisk's recorded voice
prompts) are Debian packages; :func:`fetch_debs` unpacks them under one folder and stamps what it fetched, so a
second call fetches nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainers.corpus.languages import CorpusError


def fetch_debs(dest: str | os.PathLike, packages: Sequence[str], error: type[CorpusError] = CorpusError) -> Path:
    """Download ``packages`` with ``apt-get download`` and unpack each into ``dest`` with ``dpkg-deb -x``.

    Packages already unpacked there (stamped under ``dest/.fetched``) are not fetched again. The ``.deb`` files
    go to a temporary folder inside ``dest`` and are removed after; no package is stamped before all of them are
    unpacked, so after a failure the next call fetches and unpacks them all again.

    Raises:
        error: the tools are missing (not Debian or Ubuntu), ``dest`` cannot be written, or ``apt-get download``
            or ``dpkg-deb`` failed (their last line).

    Returns:
        ``dest``.
    """
    dest = Path(dest).expanduser()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise error(f"{tool} not found: fetching {', '.join(packages)} needs Debian or Ubuntu; on another "
                        f"system unpack the .deb files yourself and pass their root with --from")
    stamps = dest / ".fetched"
    todo = [p for p in packages if not (stamps / p).is_file()]
    if not todo:
        return dest
    try:
        dest.mkdir(parents=True, exist_ok=True)
        download = tempfile.TemporaryDirectory(dir=dest, prefix=".download-")
    except OSError as err:
        raise error(f"cannot download {', '.join(todo)} into {dest}: {err.strerror or err}; pass --cache DIR on a "
                    f"writable disk with room for the packages") from err
    with download as tmp:
        run = subprocess.run(["apt-get", "download", *todo], cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0:
            raise error(
                f"apt-get download {' '.join(todo)} failed: {run.stderr.strip().splitlines()[-1:] or '?'}; "
                f"check the network and run `apt-get update` (the packages are in Debian and Ubuntu 'main')")
        for deb in sorted(Path(tmp).glob("*.deb")):
            unpack = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
            if unpack.returncode != 0:
                raise error(f"dpkg-deb could not unpack {deb.name} into {dest}: "
                            f"{unpack.stderr.strip().splitlines()[-1:] or '?'}; free some space or pass --cache DIR "
                            f"on another disk, then run the command again (what was unpacked is fetched again)")
        stamps.mkdir(exist_ok=True)
        for p in todo:
            (stamps / p).touch()
    return dest


def import_listing(sound_dir: Path, rows: Iterable[dict], out: str | os.PathLike, *, link: str, card: dict,
                   overwrite: bool = False, progress: bool = True,
                   skipped: list[tuple[str, str]] | None = None) -> None:
    """Import clips listed by ``rows`` from ``sound_dir`` (an unpacked package, never written to: it may be an
    installed, read-only one) as a corpus at ``out``.

    A temporary ``audiofolder`` holds ``metadata.jsonl`` (one row per clip: ``file_name`` relative to
    ``sound_dir``, ``transcription``, ``language``, ``split``, ``speaker``) beside a link named ``link`` to
    ``sound_dir``; :func:`trainers.corpus.importers.corpus_from_dir` reads it, leaving out (and appending to
    ``skipped``) clips it cannot decode, and :func:`trainers.corpus.loading.save_corpus` writes it with ``card``.
    Clip ids are the paths under the folder: ``<link>-<file_name without suffix, / as ->``.
    """
    from trainers.corpus.importers import corpus_from_dir
    from trainers.corpus.loading import save_corpus

    skipped = [] if skipped is None else skipped
    with tempfile.TemporaryDirectory(prefix=f"{link}-") as tmp:
        folder = Path(tmp)
        (folder / link).symlink_to(Path(sound_dir).resolve(), target_is_directory=True)
        with (folder / "metadata.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "file_name": f"{link}/{row['file_name']}"}, ensure_ascii=False) + "\n")
        corpus = corpus_from_dir(folder, skip_bad=True, skipped=skipped, progress=progress)
    save_corpus(corpus, out, overwrite=overwrite, progress=False, card={**card, "skipped": len(skipped)})
