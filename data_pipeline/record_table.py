"""The sharder's records as columns, so that the driver's memory per sample stays small.

Why not a list of FaceRecord: a record and its Path, strings and the dicts keyed by it cost the
driver ~2.3 KB per sample (500k images: ~1.2 GB), while the manifest keeps only statistics.
Here a sample is ~100 bytes (90 B of columns on 200k UTKFace-style names): numbers in typed arrays, strings in one UTF-8 blob with offsets,
and an image path that is "<folder>/<original id>" (every folder-based adapter's case) stored as
the folder's index alone. `record(i)` rebuilds the FaceRecord when a worker writes the sample.
Arrays from the standard library's `array` module grow in place (numpy would copy on append);
`numpy()` views them without a copy for the vectorised steps (splits, statistics, duplicates).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.records import FaceRecord


class TextColumn:
    """Optional strings in one blob: ~1 byte per character + 9 bytes per entry."""

    def __init__(self) -> None:
        self._blob = bytearray()
        self._ends = array("q")
        self._none = bytearray()

    def append(self, text: str | None) -> None:
        self._none.append(text is None)
        if text is not None:
            self._blob += text.encode("utf-8", "surrogateescape")
        self._ends.append(len(self._blob))

    def __getitem__(self, i: int) -> str | None:
        if self._none[i]:
            return None
        start = self._ends[i - 1] if i else 0
        return self._blob[start:self._ends[i]].decode("utf-8", "surrogateescape")

    def __len__(self) -> int:
        return len(self._ends)

    def nbytes(self) -> int:
        return len(self._blob) + self._ends.itemsize * len(self._ends) + len(self._none)


_NONE, _PATH, _INLINE = -1, -2, -3  # image/body kinds below the folder indices


class RecordTable:
    """Every labelled input of one `agescale shard` run, in collection order (--src order, then
    adapter order: the order the de-duplication keeps first copies by)."""

    def __init__(self) -> None:
        self.sources: list[str] = []            # distinct dataset names
        self.folders: list[str] = []            # distinct "<folder>/" prefixes of image paths
        self._source_of: dict[str, int] = {}
        self._folder_of: dict[str, int] = {}
        self.age = array("d")
        self.gender = array("b")                # -1: unknown
        self.race = array("b")
        self.source = array("h")
        self.pair = array("h")                  # index of the (dataset, --src) pair
        self._image_kind = array("i")           # folder index, or _PATH / _INLINE
        self._body_kind = array("b")            # _NONE, _PATH or _INLINE
        self.original_id = TextColumn()
        self.subject = TextColumn()
        self._image_path = TextColumn()         # the whole path when it is not folder + id
        self._body_path = TextColumn()
        self._inline: dict[tuple[str, int], bytes] = {}  # images held in memory (rare)

    def __len__(self) -> int:
        return len(self.age)

    def append(self, rec: FaceRecord, pair: int) -> None:
        i = len(self.age)
        self.age.append(float(rec.age))
        self.gender.append(-1 if rec.gender is None else rec.gender)
        self.race.append(-1 if rec.race is None else rec.race)
        self.source.append(self._intern(rec.source, self.sources, self._source_of))
        self.pair.append(pair)
        self.original_id.append(rec.original_id)
        self.subject.append(rec.subject)
        kind, whole = self._place(rec.image, "image", i)
        if kind == _PATH:
            folder = whole[: len(whole) - len(rec.original_id)]
            if whole.endswith(rec.original_id) and folder.endswith("/"):
                kind, whole = self._intern(folder, self.folders, self._folder_of), None
        self._image_kind.append(kind)
        self._image_path.append(whole)
        kind, whole = self._place(rec.body, "body", i)
        self._body_kind.append(kind)
        self._body_path.append(whole)

    def _place(self, item: Path | bytes | None, column: str, i: int) -> tuple[int, str | None]:
        if item is None:
            return _NONE, None
        if isinstance(item, bytes):
            self._inline[(column, i)] = item
            return _INLINE, None
        return _PATH, str(item)

    @staticmethod
    def _intern(value: str, values: list[str], index: dict[str, int]) -> int:
        if value not in index:
            index[value] = len(values)
            values.append(value)
        return index[value]

    def image(self, i: int) -> Path | bytes:
        kind = self._image_kind[i]
        if kind == _INLINE:
            return self._inline[("image", i)]
        if kind == _PATH:
            return Path(self._image_path[i])
        return Path(self.folders[kind] + self.original_id[i])

    def body(self, i: int) -> Path | bytes | None:
        kind = self._body_kind[i]
        if kind == _NONE:
            return None
        return self._inline[("body", i)] if kind == _INLINE else Path(self._body_path[i])

    def has_body(self) -> np.ndarray:
        return self.numpy("_body_kind") != _NONE

    def source_name(self, i: int) -> str:
        return self.sources[self.source[i]]

    def record(self, i: int) -> FaceRecord:
        g, r = self.gender[i], self.race[i]
        return FaceRecord(image=self.image(i), age=self.age[i], source=self.source_name(i),
                          original_id=self.original_id[i], gender=None if g < 0 else g, race=None if r < 0 else r,
                          subject=self.subject[i], body=self.body(i))

    def numpy(self, column: str) -> np.ndarray:
        """A column as a numpy array sharing the column's memory (valid until the next append)."""
        col = getattr(self, column)
        return np.frombuffer(col, dtype=col.typecode) if len(col) else np.zeros(0, col.typecode)

    def nbytes(self) -> int:
        arrays = (self.age, self.gender, self.race, self.source, self.pair, self._image_kind, self._body_kind)
        return (sum(a.itemsize * len(a) for a in arrays) + self.original_id.nbytes() + self.subject.nbytes()
                + self._image_path.nbytes() + self._body_path.nbytes())


class Members(Sequence):
    """The samples of one shard, as (key, FaceRecord) pairs built when iterated: the parent holds
    only the table indices. Pickled (for a Ray task) as the plain list, so a task never carries
    the whole table."""

    def __init__(self, table: RecordTable, keys: np.ndarray, indices: np.ndarray) -> None:
        self.table, self.keys, self.indices = table, keys, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return Members(self.table, self.keys, self.indices[n])
        i = int(self.indices[n])
        return self.keys[i].decode(), self.table.record(i)

    def __iter__(self) -> Iterator[tuple[str, FaceRecord]]:
        for i in self.indices.tolist():
            yield self.keys[i].decode(), self.table.record(i)

    def without(self, dropped: np.ndarray) -> "Members":
        return Members(self.table, self.keys, self.indices[~np.isin(self.indices, dropped)])

    def __reduce__(self):
        return list, (list(self),)
