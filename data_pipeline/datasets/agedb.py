"""AgeDB: `id_name_age_gender.jpg`, e.g. `0_MariaCallas_35_f.jpg`; the name is the subject."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import records_from_names
from data_pipeline.records import FaceRecord, Rejected

NAME = re.compile(r"^(\d+)_(.+)_(\d+)_([mf])\.jpe?g$", re.IGNORECASE)


def parse_name(name: str) -> dict:
    m = NAME.match(name)
    if not m:
        raise ValueError("expected id_name_age_gender.jpg with gender m or f")
    _, subject, age, gender = m.groups()
    return {"age": float(age), "gender": 0 if gender.lower() == "m" else 1, "subject": subject}


@register_dataset("agedb", "AgeDB folder; labels from id_name_age_gender.jpg")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    return records_from_names(src, "agedb", parse_name)
