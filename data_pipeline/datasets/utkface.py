"""UTKFace: labels are in the file name, `[age]_[gender]_[race]_[datetime].jpg[.chip.jpg]`.

gender 0 = male, 1 = female; race 0-4 = White, Black, Asian, Indian, Others; datetime has 17
digits. A name that does not follow the pattern exactly is rejected with the reason, never
guessed (the real dataset has 8 such files). UTKFace has no subject ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import records_from_names
from data_pipeline.records import FaceRecord, Rejected

SOURCE = "utkface"


def parse_name(name: str) -> tuple[int, int, int]:
    """(age, gender, race) from a UTKFace file name; ValueError says what is wrong."""
    for suffix in (".jpg.chip.jpg", ".jpg"):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            break
    else:
        raise ValueError("name does not end in .jpg or .jpg.chip.jpg")
    fields = stem.split("_")
    if len(fields) != 4:
        raise ValueError(f"expected 4 '_'-separated fields [age]_[gender]_[race]_[datetime], got {len(fields)}")
    age, gender, race, stamp = fields
    if not age.isdigit():
        raise ValueError(f"age field {age!r} is not a whole number")
    if gender not in ("0", "1"):
        raise ValueError(f"gender field {gender!r} is not 0 or 1")
    if race not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"race field {race!r} is not 0-4")
    if not (stamp.isdigit() and len(stamp) == 17):
        raise ValueError(f"datetime field {stamp!r} is not 17 digits")
    return int(age), int(gender), int(race)


def _labels(name: str) -> dict:
    age, gender, race = parse_name(name)
    return {"age": float(age), "gender": gender, "race": race}


@register_dataset("utkface", "UTKFace folder; labels from [age]_[gender]_[race]_[datetime].jpg[.chip.jpg]")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    return records_from_names(src, SOURCE, _labels)
