"""Typed config for the data path (the `data:` section of a run config)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    """Config base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_splits(text: str) -> dict[str, float]:
    """Parse `train=0.8,val=0.1,test=0.1` (the `--splits` flag) into a mapping."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or not name:
            raise ValueError(f"--splits: expected NAME=RATIO, got {part.strip()!r} in {text!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--splits: ratio of {name.strip()!r} is not a number: {value!r}") from None
    return check_splits(out)


def check_splits(splits: dict[str, float]) -> dict[str, float]:
    if not splits:
        raise ValueError("at least one split is needed, e.g. test=1")
    for name, ratio in splits.items():
        if not SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must be lower-case letters, digits and '_'")
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"split {name!r} has ratio {ratio}; ratios must be > 0")
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split ratios must add up to 1, got {total:g} ({splits})")
    return splits


class ShardConfig(Strict):
    """How `agescale shard` splits and packs samples."""

    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = Field(0, ge=0)
    # Shard count per split = max(min_shards_per_split, ceil(n / max_samples_per_shard)), at most n.
    # min_shards_per_split keeps every rank x loader worker fed (webdataset fails on an empty one).
    max_samples_per_shard: int = Field(1000, ge=1)
    min_shards_per_split: int = Field(8, ge=1)
    max_side: int | None = Field(None, ge=16, description="shrink images whose longer side exceeds this")
    jpeg_quality: int = Field(95, ge=50, le=100, description="quality when --max-side re-encodes")
    workers: int | None = Field(None, ge=1, description="decode-check processes; default: all cores")

    @field_validator("splits")
    @classmethod
    def _valid_splits(cls, v: dict[str, float]) -> dict[str, float]:
        return check_splits(v)


class LabelConfig(Strict):
    """Valid age range and the age bins used for stratification and reports."""

    min_age: float = Field(0.0, ge=0)
    max_age: float = Field(120.0, gt=0, le=150)
    bin_width: int = Field(10, ge=1)
    last_bin_start: int = Field(100, ge=1, description="ages >= this fall into one open bin, e.g. '100+'")


class IngestConfig(Strict):
    """Per-dataset reading options."""

    appa_real_age: Literal["real", "apparent"] = "real"
    appa_real_face_crops: bool = Field(True, description="read APPA-REAL's aligned '<file>_face.jpg' crops")
    imdb_wiki_min_face_score: float = 1.0
    imdb_wiki_allow_second_face: bool = False


class DataConfig(Strict):
    labels: LabelConfig = Field(default_factory=LabelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
