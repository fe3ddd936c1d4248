"""FG-NET: `001A02.JPG` is subject 001 at age 2; some names carry a letter, `001A43a.JPG`.

No gender or race in the names. Subject ids make the splits subject-disjoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import records_from_names
from data_pipeline.records import FaceRecord, Rejected

NAME = re.compile(r"^(\d{3})A(\d{2})([a-z])?\.jpe?g$", re.IGNORECASE)


def parse_name(name: str) -> dict:
    m = NAME.match(name)
    if not m:
        raise ValueError("expected SSSAyy.JPG (3-digit subject, 'A', 2-digit age)")
    return {"age": float(m.group(2)), "subject": m.group(1)}


@register_dataset("fgnet", "FG-NET folder; labels from SSSAyy[x].JPG (subject SSS, age yy)")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    return records_from_names(src, "fgnet", parse_name)
