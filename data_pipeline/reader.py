"""Random access to the samples of one split, through the DALI index files.

The index gives each component's offset and size, so a sample is two slices of a memory-mapped
tar: no tar parsing at run time, and any sample can be read first, which is what exact
resume and a global per-epoch order need (see plan.py). Files are mapped lazily, per process,
so the object can be handed to forked loader workers.
"""

from __future__ import annotations

import io
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from base.errors import UserError
from data_pipeline.images import to_rgb
from data_pipeline.shard import BODY_PREFIX, LABELS_EXT, load_manifest
from data_pipeline.tarshard import read_index

IMAGE_EXTS = ("jpg", "png")


class DataError(UserError):
    """Bad data met at read time; the message names the shard and the sample key."""


def batch_error(messages: list[str]) -> DataError:
    """One error for a batch's bad samples: the first, and how many more."""
    more = f" (and {len(messages) - 1} more in this batch)" if len(messages) > 1 else ""
    return DataError(messages[0] + more)


@dataclass(frozen=True)
class SampleRef:
    shard: int
    key: str
    image: tuple[int, int]   # offset, size
    labels: tuple[int, int]
    body: tuple[int, int] | None = None  # the optional second crop


class ShardIndex:
    """All samples of `split` under the shard directory `root`, in stored order."""

    def __init__(self, root: Path | str, split: str):
        self.root, self.split = Path(root), split
        manifest = load_manifest(self.root)
        if split not in manifest["splits"]:
            raise UserError(f"{self.root}: no split {split!r} (has: {', '.join(manifest['splits'])})")
        self.shards: list[Path] = []
        self.samples: list[SampleRef] = []
        self._maps: dict[int, mmap.mmap] = {}
        for shard in manifest["splits"][split]["shards"]:
            tar, idx = self.root / split / shard["tar"], self.root / split / shard["index"]
            for path, what in ((tar, "shard"), (idx, "DALI index")):
                if not path.exists():
                    raise DataError(f"{path}: {what} missing (run `agescale verify {self.root}`)")
            size = tar.stat().st_size
            if size != shard["bytes"]:
                raise DataError(f"{tar}: {size} bytes, manifest says {shard['bytes']} (truncated or altered)")
            sid = len(self.shards)
            self.shards.append(tar)
            try:
                entries = read_index(idx)
            except ValueError as e:
                raise DataError(f"{idx}: malformed DALI index ({e})") from None
            for key, comps in entries:
                ext = next((e for e in IMAGE_EXTS if e in comps), None)
                if ext is None or LABELS_EXT not in comps:
                    raise DataError(f"{idx}: sample {key} lacks an image or {LABELS_EXT}")
                body = next((comps[BODY_PREFIX + e] for e in IMAGE_EXTS if BODY_PREFIX + e in comps), None)
                self.samples.append(SampleRef(sid, key, comps[ext], comps[LABELS_EXT], body))
        # which samples carry a body crop, once: the loaders mask the others' body to zeros per batch
        self.body_mask = np.array([s.body is not None for s in self.samples], dtype=bool)
        self.has_body = bool(self.body_mask.any())
        self._labels = np.stack([self._read_labels(i) for i in range(len(self.samples))]) if self.samples \
            else np.zeros((0, 3), "<f4")

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_maps"}

    def __setstate__(self, state):
        self.__dict__.update(state, _maps={})

    def _map(self, shard: int) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is None:
            with self.shards[shard].open("rb") as f:
                m = self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def _slice(self, i: int, span: tuple[int, int]) -> bytes:
        ref = self.samples[i]
        m = self._map(ref.shard)
        off, size = span
        if off + size > len(m):
            raise DataError(f"{self.shards[ref.shard]}: sample {ref.key} ends past the end of the file (truncated)")
        return m[off:off + size]

    def _read_labels(self, i: int) -> np.ndarray:
        return np.frombuffer(self._slice(i, self.samples[i].labels), dtype="<f4")

    def image_bytes(self, i: int, body: bool = False) -> bytes | None:
        """The face image's bytes, or (`body`) the second crop's; None for a sample without one."""
        span = self.samples[i].body if body else self.samples[i].image
        return None if span is None else self._slice(i, span)

    def decode(self, i: int, body: bool = False) -> Image.Image | None:
        """Sample i (or its body crop; None without one) as an RGB PIL image (EXIF orientation
        applied, as DALI does); DataError naming the shard and key if it cannot be decoded."""
        data = self.image_bytes(i, body)
        if data is None:
            return None
        try:
            with Image.open(io.BytesIO(data)) as im:
                return to_rgb(ImageOps.exif_transpose(im), self.where(i) + (" (body crop)" if body else ""))
        except UserError as e:  # an image mode to_rgb refuses; the message names the sample
            raise DataError(str(e)) from None
        except Exception as e:  # PIL raises many types for bad data
            what = "body crop" if body else "image"
            raise DataError(f"{self.where(i)}: undecodable {what} ({type(e).__name__}: {e})") from None

    def labels(self, idx: np.ndarray) -> np.ndarray:
        """(n, 3) float32: age, gender (-1 unknown), race (-1 unknown)."""
        return self._labels[idx]

    def where(self, i: int) -> str:
        return f"{self.shards[self.samples[i].shard]}, sample {self.samples[i].key}"
