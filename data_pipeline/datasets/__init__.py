"""Dataset adapters: one module per on-disk format, each registered by name.

An adapter is a function `read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]`.
It parses labels only; images are decode-checked later, by the sharder, for every adapter alike.
Adding a dataset is one new module plus its `@register_dataset` line and an import below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from base.errors import UserError
from data_pipeline.config import IngestConfig
from data_pipeline.records import FaceRecord, Rejected

Reader = Callable[[Path, IngestConfig], Iterator[FaceRecord | Rejected]]


@dataclass(frozen=True)
class DatasetAdapter:
    name: str
    read: Reader
    summary: str


_REGISTRY: dict[str, DatasetAdapter] = {}


def register_dataset(name: str, summary: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        if name in _REGISTRY:
            raise RuntimeError(f"dataset adapter {name!r} registered twice")
        _REGISTRY[name] = DatasetAdapter(name, fn, summary)
        return fn

    return deco


def list_datasets() -> list[DatasetAdapter]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def create_dataset(name: str, src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    """Records of dataset `name` found under `src` (a folder, or a file for CSV-based formats)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    if not src.exists():
        raise UserError(f"--src {src}: no such file or directory")
    return _REGISTRY[name].read(src, cfg)


# Register the built-in adapters.
from data_pipeline.datasets import agedb, appa_real, csv_generic, fgnet, imdb_wiki, utkface  # noqa: E402,F401
