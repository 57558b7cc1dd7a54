"""Atomic writes: a reader never sees a half-written file or folder.

Files are written beside their target and renamed into place (rename is atomic on
one filesystem); folders are staged the same way, so a crash mid-save leaves the
previous version or nothing, never a folder that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """tunelab's cache (built-in models, tokenized data): ``$TUNELAB_CACHE``, default ``~/.cache/tunelab``."""
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def expand_path(reference: str) -> Path:
    """``Path(reference).expanduser()``, leaving an unknown ``~user`` as written instead of raising."""
    try:
        return Path(reference).expanduser()
    except RuntimeError:
        return Path(reference)


def looks_like_local_path(reference: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else with a path shape is a local path."""
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1 or "\\" in reference


def _umask_mode(mode: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    staging.chmod(_umask_mode(0o777))  # mkdtemp makes owner-only folders; artifacts are shared
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
