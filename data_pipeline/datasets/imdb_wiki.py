"""IMDB-WIKI: `imdb.mat` or `wiki.mat` (a MATLAB struct of per-image arrays) beside the
image folders `00/` ... `99/`.

The age is computed as the dataset's authors do: whole years from the date of birth (`dob`, a
MATLAB datenum) to 1 July of `photo_taken`. Entries are rejected, with the reason, when the
date of birth is invalid, no face was detected (face_score = -inf), the face score is below
`data.ingest.imdb_wiki_min_face_score`, a second face was found (unless
`imdb_wiki_allow_second_face`), or the image is missing. Gender there is 1 = male, 0 = female,
NaN = unknown; it is mapped to agescale's 0 = male, 1 = female. The subject is `celeb_id`
(IMDB) or the name (WIKI). The photos are in the wild and large: shard with `--max-side`.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from base.errors import UserError
from data_pipeline.config import IngestConfig
from data_pipeline.datasets import register_dataset
from data_pipeline.records import FaceRecord, Rejected

SOURCE = "imdb_wiki"


def matlab_datenum_to_date(datenum: float) -> dt.date:
    """MATLAB counts days from year 0; Python's ordinal from year 1 (366 days later)."""
    if not math.isfinite(datenum) or datenum < 367:
        raise ValueError(f"date of birth datenum {datenum} is invalid")
    return dt.date.fromordinal(int(datenum) - 366)


def age_at_photo(dob: float, photo_taken: float) -> int:
    born = matlab_datenum_to_date(dob)
    if not math.isfinite(photo_taken):
        raise ValueError(f"photo_taken {photo_taken} is invalid")
    taken = dt.date(int(photo_taken), 7, 1)
    return taken.year - born.year - ((taken.month, taken.day) < (born.month, born.day))


def _field(struct: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(struct[name][0, 0]).reshape(-1) if name in struct.dtype.names else None


def _text(cell) -> str:
    arr = np.asarray(cell).reshape(-1)
    return str(arr[0]) if arr.size else ""


@register_dataset("imdb_wiki", "IMDB-WIKI folder with imdb.mat or wiki.mat; age = photo_taken - dob")
def read(src: Path, cfg: IngestConfig) -> Iterator[FaceRecord | Rejected]:
    from scipy.io import loadmat

    mats = [src / n for n in ("imdb.mat", "wiki.mat") if (src / n).exists()] if src.is_dir() else [src]
    if not mats:
        raise UserError(f"{src}: no imdb.mat or wiki.mat (IMDB-WIKI layout)")
    for mat in mats:
        root = mat.parent
        try:
            data = loadmat(mat)
        except Exception as e:  # scipy raises several types for a bad file
            raise UserError(f"{mat}: not a readable MATLAB file ({e})") from None
        key = next((k for k in ("imdb", "wiki") if k in data), None)
        if key is None:
            raise UserError(f"{mat}: no 'imdb' or 'wiki' struct inside")
        s = data[key]
        missing = [f for f in ("dob", "photo_taken", "full_path", "gender", "face_score", "second_face_score")
                   if f not in s.dtype.names]
        if missing:
            raise UserError(f"{mat}: struct '{key}' lacks field(s) {', '.join(missing)}")
        dob, taken, paths = _field(s, "dob"), _field(s, "photo_taken"), _field(s, "full_path")
        gender, score, second = _field(s, "gender"), _field(s, "face_score"), _field(s, "second_face_score")
        celeb, names = _field(s, "celeb_id"), _field(s, "name")
        for i in range(len(paths)):
            rel = _text(paths[i])
            rid = f"{key}/{rel}"
            try:
                age = age_at_photo(float(dob[i]), float(taken[i]))
            except (ValueError, OverflowError) as e:
                yield Rejected(SOURCE, rid, str(e))
                continue
            if not math.isfinite(float(score[i])):
                yield Rejected(SOURCE, rid, "no face detected (face_score is -inf)")
                continue
            if float(score[i]) < cfg.imdb_wiki_min_face_score:
                yield Rejected(SOURCE, rid, f"face_score {float(score[i]):.2f} below {cfg.imdb_wiki_min_face_score}")
                continue
            if not cfg.imdb_wiki_allow_second_face and not math.isnan(float(second[i])):
                yield Rejected(SOURCE, rid, "a second face is in the photo")
                continue
            image = root / rel
            if not image.exists():
                yield Rejected(SOURCE, rid, f"image file {rel} not found")
                continue
            g = float(gender[i])
            subject = (str(int(celeb[i])) if celeb is not None else _text(names[i]) if names is not None else None)
            yield FaceRecord(image=image, age=float(age), gender=None if math.isnan(g) else (0 if g == 1 else 1),
                             subject=subject or None, source=SOURCE, original_id=rid)
