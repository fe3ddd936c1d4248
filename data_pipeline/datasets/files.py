"""Helpers shared by the folder-based adapters."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from base.errors import UserError
from data_pipeline.records import FaceRecord, Rejected

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(root: Path) -> Iterator[Path]:
    """Image files under `root` in a stable order (sorted relative paths), hidden files skipped."""
    for path, _ in image_files_with_ids(root):
        yield path


def image_files_with_ids(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, id relative to `root` in posix form) per image file, as `image_files` orders them.
    The id comes from the walk itself: a stat and a relative_to per file cost 20 us, a sixth of
    the sharder's serial time on 6,000 files."""
    if root.is_file():
        yield root, root.name
        return
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [n if rel == "." else f"{rel}/{n}" for n in names
                  if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)]
    for rel in sorted(found):
        yield root / rel, rel


def records_from_names(src: Path, source: str, parse: Callable[[str], dict]) -> Iterator[FaceRecord | Rejected]:
    """For datasets whose labels live in the file name: `parse(name)` returns the FaceRecord's
    label fields or raises ValueError saying what is wrong with the name."""
    for path, rid in image_files_with_ids(src):
        try:
            labels = parse(path.name)
        except ValueError as e:
            yield Rejected(source, rid, f"bad file name: {e}")
            continue
        yield FaceRecord(image=path, source=source, original_id=rid, **labels)


def read_text(path: Path) -> str:
    """A dataset's label file as text (UTF-8, BOM allowed); UserError naming it otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def parse_gender(text: str) -> int | None:
    """'0'/'m'/'male' → 0, '1'/'f'/'female' → 1, '' → None (unknown); anything else is an error."""
    t = text.strip().lower()
    if t in ("", "nan", "na", "unknown", "-1"):
        return None
    if t in ("0", "m", "male"):
        return 0
    if t in ("1", "f", "female"):
        return 1
    raise ValueError(f"gender {text!r} is not one of 0/1, m/f, male/female or empty")
