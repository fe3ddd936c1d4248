"""APPA-REAL: `gt_avg_{train,valid,test}.csv` (file_name, num_ratings, apparent_age_avg,
apparent_age_std, real_age) beside the folders `train/`, `valid/`, `test/`.

The age is the real age by default (`data.ingest.appa_real_age=apparent` for the apparent
one). With `data.ingest.appa_real_face_crops` (default) the aligned `<file>_face.jpg` crop that
the release ships next to each photo is read; a missing crop is rejected, not replaced by the
photo. Gender and race come from `allcategories_<split>.csv` when present. The release's own
split is kept only in the original id: agescale makes its own splits.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

from base.errors import UserError
from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import parse_gender, read_text
from data_pipeline.records import FaceRecord, Rejected

SOURCE = "appa_real"
SPLITS = ("train", "valid", "test")
RACES = {"caucasian": 0, "afroamerican": 1, "asian": 2}


def _categories(src: Path, split: str) -> dict[str, tuple[int | None, int | None]]:
    path = src / f"allcategories_{split}.csv"
    if not path.exists():
        return {}
    out = {}
    for row in csv.DictReader(io.StringIO(read_text(path), newline="")):
        try:
            gender = parse_gender(row.get("gender", ""))
        except ValueError:
            gender = None
        out[row["file"]] = (gender, RACES.get(row.get("race", "").strip().lower()))
    return out


@register_dataset("appa_real", "APPA-REAL release folder; gt_avg_<split>.csv with real and apparent age")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    tables = [(s, src / f"gt_avg_{s}.csv") for s in SPLITS if (src / f"gt_avg_{s}.csv").exists()]
    if not tables:
        raise UserError(f"{src}: no gt_avg_train.csv / gt_avg_valid.csv / gt_avg_test.csv (APPA-REAL layout)")
    age_column = "real_age" if cfg.appa_real_age == "real" else "apparent_age_avg"
    for split, table in tables:
        cats = _categories(src, split)
        reader = csv.DictReader(io.StringIO(read_text(table), newline=""))
        missing = {"file_name", age_column} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{table}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            name = row["file_name"].strip()
            rid = f"{split}/{name}"
            try:
                age = float(row[age_column])
            except ValueError:
                yield Rejected(SOURCE, rid, f"{table.name} line {line}: {age_column} {row[age_column]!r} is not a number")
                continue
            image = src / split / (f"{name}_face.jpg" if cfg.appa_real_face_crops else name)
            if not image.exists():
                yield Rejected(SOURCE, rid, f"image file {image.relative_to(src)} not found")
                continue
            gender, race = cats.get(name, (None, None))
            yield FaceRecord(image=image, age=age, gender=gender, race=race, source=SOURCE, original_id=rid)
