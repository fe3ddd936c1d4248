"""The one record type every dataset adapter produces, and age-bin helpers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import LabelConfig

# Gender codes follow UTKFace: 0 = male, 1 = female. Race codes follow UTKFace too.
GENDERS = {0: "male", 1: "female"}
RACES = {0: "white", 1: "black", 2: "asian", 3: "indian", 4: "other"}


@dataclass(frozen=True, slots=True)
class FaceRecord:
    """One labelled face image, before sharding (slots: the sharder holds one per input)."""

    image: Path | bytes
    age: float
    source: str
    original_id: str
    gender: int | None = None
    race: int | None = None
    subject: str | None = None
    body: Path | bytes | None = None  # an optional second crop of the same person (MiVOLO's body input)


@dataclass(frozen=True)
class Rejected:
    """An input that was not used, and why (kept in the manifest)."""

    source: str
    input: str
    reason: str


def check_age(record: FaceRecord, labels: LabelConfig) -> str | None:
    """Return why the record's age is unusable, or None if it is fine."""
    if not math.isfinite(record.age):
        return f"age {record.age} is not a finite number"
    if not labels.min_age <= record.age <= labels.max_age:
        return f"age {record.age:g} outside [{labels.min_age:g}, {labels.max_age:g}]"
    return None


def age_bin(age: float, labels: LabelConfig) -> str:
    """Bin name such as '20-29', or '100+' for the open last bin."""
    if age >= labels.last_bin_start:
        return f"{labels.last_bin_start}+"
    lo = int(age // labels.bin_width) * labels.bin_width
    return f"{lo}-{min(lo + labels.bin_width, labels.last_bin_start) - 1}"


def age_bin_names(labels: LabelConfig) -> list[str]:
    names = [f"{lo}-{min(lo + labels.bin_width, labels.last_bin_start) - 1}"
             for lo in range(0, labels.last_bin_start, labels.bin_width)]
    return names + [f"{labels.last_bin_start}+"]


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(source: str, original_id: str) -> str:
    """WebDataset/DALI key: '<source>-<id without extensions>'.

    Keys may not contain dots (both readers split the extension at the first dot of the name)
    nor slashes, so everything else becomes '_'.
    """
    stem = original_id.replace("\\", "/")
    head, _, base = stem.rpartition("/")
    base = base.split(".", 1)[0]
    stem = f"{head}/{base}" if head else base
    return f"{source}-{_KEY_UNSAFE.sub('_', stem).strip('_')}"
