"""FG-NET: `001A02.JPG` is subject 001 at age 2; some names carry a letter, `001A43a.JPG`.

No gender or race in the names. Subject ids make the splits subject-disjoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.datasets.files import image_files, relative_id
from data_pipeline.records import FaceRecord, Rejected

SOURCE = "fgnet"
NAME = re.compile(r"^(\d{3})A(\d{2})([a-z])?\.jpe?g$", re.IGNORECASE)


@register_dataset("fgnet", "FG-NET folder; labels from SSSAyy[x].JPG (subject SSS, age yy)")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    for path in image_files(src):
        rid = relative_id(path, src)
        m = NAME.match(path.name)
        if not m:
            yield Rejected(SOURCE, rid, "bad file name: expected SSSAyy.JPG (3-digit subject, 'A', 2-digit age)")
            continue
        yield FaceRecord(image=path, age=float(m.group(2)), subject=m.group(1), source=SOURCE, original_id=rid)
