"""AgeDB: `id_name_age_gender.jpg`, e.g. `0_MariaCallas_35_f.jpg`; the name is the subject."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import image_files, relative_id
from data_pipeline.records import FaceRecord, Rejected

SOURCE = "agedb"
NAME = re.compile(r"^(\d+)_(.+)_(\d+)_([mf])\.jpe?g$", re.IGNORECASE)


@register_dataset("agedb", "AgeDB folder; labels from id_name_age_gender.jpg")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    for path in image_files(src):
        rid = relative_id(path, src)
        m = NAME.match(path.name)
        if not m:
            yield Rejected(SOURCE, rid, "bad file name: expected id_name_age_gender.jpg with gender m or f")
            continue
        _, name, age, gender = m.groups()
        yield FaceRecord(image=path, age=float(age), gender=0 if gender.lower() == "m" else 1,
                         subject=name, source=SOURCE, original_id=rid)
