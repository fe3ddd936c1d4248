"""Any CSV of `path,age[,gender][,race][,subject][,body]`.

With a header row the columns are found by name (`path` and `age` required); without one they
are taken in that order. Paths are relative to the CSV's folder. gender: 0/m/male, 1/f/female
or empty for unknown. `body` (with a header only): an optional second crop of the same person (a wider, body crop
for MiVOLO), stored as `<key>.body.jpg`; empty where there is none. A row with a bad value, or with more or fewer fields than the header,
is rejected (listed in the manifest) with its line number and reason.
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

SOURCE = "csv"
COLUMNS = ("path", "age", "gender", "race", "subject", "body")
POSITIONAL = COLUMNS[:5]  # without a header; a body column needs the header (it names the crop's column)


@register_dataset("csv", "CSV file of path,age[,gender][,race][,subject], paths relative to the CSV")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    if not src.is_file():
        raise UserError(f"--src {src}: the csv dataset expects a CSV file")
    rows = _rows(src)
    if not rows:
        raise UserError(f"{src}: empty CSV")
    header = [c.strip().lower() for c in rows[0][1]]
    if "path" in header or "age" in header:
        missing = {"path", "age"} - set(header)
        if missing:
            raise UserError(f"{src}: header lacks column(s) {', '.join(sorted(missing))}")
        unknown = set(header) - set(COLUMNS)
        if unknown:
            raise UserError(f"{src}: unknown column(s) {', '.join(sorted(unknown))}; allowed: {', '.join(COLUMNS)}")
        cols, body, allowed = header, rows[1:], range(len(header), len(header) + 1)
    else:
        cols, body, allowed = list(POSITIONAL), rows, range(2, len(POSITIONAL) + 1)
    for line, row in body:
        if not row or not any(c.strip() for c in row):
            continue
        where = f"{src.name} line {line}"
        if len(row) not in allowed:
            # zip() would silently drop extra fields or leave columns unset: a misaligned row.
            expected = f"{allowed[0]}" if len(allowed) == 1 else f"{allowed[0]}-{allowed[-1]}"
            yield Rejected(SOURCE, row[0].strip() or where,
                           f"{where}: {len(row)} fields, expected {expected} ({','.join(cols[:allowed[-1]])})")
            continue
        values = dict(zip(cols, (c.strip() for c in row)))
        rel = values.get("path", "")
        try:
            age = float(values.get("age", ""))
        except ValueError:
            yield Rejected(SOURCE, rel or where, f"{where}: age {values.get('age')!r} is not a number")
            continue
        try:
            gender = parse_gender(values.get("gender", ""))
            race = int(values["race"]) if values.get("race") else None
            if race is not None and race not in range(5):
                raise ValueError(f"race {race} is not 0-4")
        except ValueError as e:
            yield Rejected(SOURCE, rel, f"{where}: {e}")
            continue
        image = (src.parent / rel)
        if not rel or not image.is_file():
            yield Rejected(SOURCE, rel or where, f"{where}: image file {rel!r} not found")
            continue
        body_rel = values.get("body", "")
        body = src.parent / body_rel if body_rel else None
        if body is not None and not body.is_file():
            yield Rejected(SOURCE, rel, f"{where}: body crop file {body_rel!r} not found")
            continue
        yield FaceRecord(image=image, age=age, gender=gender, race=race, subject=values.get("subject") or None,
                         source=SOURCE, original_id=rel, body=body)


def _rows(src: Path) -> list[tuple[int, list[str]]]:
    """(line number where the row starts, as an editor shows it, fields) for each CSV row; a
    quoted field may span lines, so the row count is not the line number."""
    reader = csv.reader(io.StringIO(read_text(src), newline=""))
    rows, start = [], 1
    for row in reader:
        rows.append((start, row))
        start = reader.line_num + 1
    return rows
