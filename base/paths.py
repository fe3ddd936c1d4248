"""Output paths checked before any work: a `--out` that is a file, sits under a file or cannot
be written is a one-line error up front, not a traceback after minutes of compute."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from base.errors import UserError


def _nearest_existing(path: Path, label: str) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
        if p.is_symlink():
            raise UserError(f"{label}: {p} is a broken symbolic link")
    return Path(os.sep)


def _probe(directory: Path, label: str) -> None:
    """Writable means a file can be created there (os.access says yes to root on read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".agescale-probe-")
    except OSError as e:
        raise UserError(f"{label}: cannot write in {directory} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)


def out_dir(path: Path, flag: str = "--out", label: str | None = None) -> Path:
    """`path` as an output directory (it may not exist yet)."""
    label = label or f"{flag} {path}"
    base = _nearest_existing(path, label)
    if not base.is_dir():
        raise UserError(f"{label}: is a file, not a directory" if base == path
                        else f"{label}: {base} is a file, so no directory can be made under it")
    _probe(base, label)
    return path


def out_file(path: Path, flag: str = "--out") -> Path:
    """`path` as an output file (its folder may not exist yet)."""
    label = f"{flag} {path}"
    if path.is_dir():
        raise UserError(f"{label}: is a directory; give a file path")
    out_dir(path.parent, flag, label)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{label}: the file exists and is read-only")
    return path
