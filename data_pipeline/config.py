"""Typed config for the data path (the `data:` section of a run config)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from base.config import Strict

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
    workers: int | None = Field(None, ge=1, description="decode-check processes (the local Ray instance's CPUs "
                                "with executor ray); default: all cores")
    executor: Literal["local", "ray"] = Field("local", description="local: a process pool; ray: one Ray task per "
                                              "shard (sources and --out on a filesystem every node sees)")
    ray_address: str | None = Field(None, description="executor ray: an existing cluster ('auto' or host:port); "
                                    "default: a private local instance")

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




class AugmentPolicy(Strict):
    """Training augmentation; each knob means the same in DALI and torchvision.

    `strength` scales every magnitude and probability below except the flip (a symmetry of
    faces, not a perturbation): rotation, colour jitter, 1 - min crop scale, the ratio's
    distance from 1, grayscale and blur probabilities. 0 turns augmentation off; Ray Tune
    searches it.
    """

    strength: float = Field(1.0, ge=0, le=4)
    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="random resized crop: area fraction range")
    crop_ratio: tuple[float, float] = Field((0.9, 1.1), description="random resized crop: aspect ratio range")
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation, degrees")
    brightness: float = Field(0.2, ge=0, le=1, description="factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.2, ge=0, le=1)
    saturation: float = Field(0.2, ge=0, le=1)
    hue: float = Field(0.02, ge=0, le=0.5, description="shift drawn from [-h, h], fraction of the colour circle")
    grayscale: float = Field(0.05, ge=0, le=1, description="probability")
    blur: float = Field(0.0, ge=0, le=1, description="probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = Field((0.1, 1.5))

    @field_validator("crop_scale", "crop_ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"range must satisfy 0 < low <= high, got {list(v)}")
        return v

    def scaled(self) -> "AugmentPolicy":
        """The policy with `strength` applied (and strength 1)."""
        s = self.strength
        clip = lambda p: min(1.0, max(0.0, p * s))  # noqa: E731
        lo, hi = self.crop_scale
        r_lo, r_hi = self.crop_ratio
        return self.model_copy(update={
            "strength": 1.0, "rotation": min(180.0, self.rotation * s),
            "brightness": clip(self.brightness), "contrast": clip(self.contrast),
            "saturation": clip(self.saturation), "hue": min(0.5, self.hue * s),
            "grayscale": clip(self.grayscale), "blur": clip(self.blur),
            "crop_scale": (max(0.05, 1 - (1 - lo) * s), min(1.0, max(hi, 1 - (1 - lo) * s))),
            "crop_ratio": (max(0.1, 1 - (1 - r_lo) * s), max(1 - (1 - r_lo) * s, 1 + (r_hi - 1) * s)),
        })


class ProgressiveResize(Strict):
    """Training resolution by epoch (FFCV's progressive resizing): `start_size` up to
    `epoch <= start_epoch`, then a linear ramp to the loader's `image_size` at `end_epoch`,
    rounded down to a multiple of `multiple`. Evaluation always uses `image_size`. The size is
    a function of the epoch alone, so a resumed run continues at the size its epoch asks for."""

    start_size: int | None = Field(None, ge=16, le=1024, description="null = off (always image_size)")
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(1, ge=1)
    multiple: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _ramp(self) -> "ProgressiveResize":
        if self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch {self.end_epoch} must exceed start_epoch {self.start_epoch}")
        return self

    def size_at(self, epoch: int, final: int) -> int:
        if self.start_size is None:
            return final
        t = min(1.0, max(0.0, (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)))
        size = self.start_size + t * (final - self.start_size)
        return max(self.multiple, int(size) // self.multiple * self.multiple) if t < 1 else final


class LoaderConfig(Strict):
    """How batches are produced. Every backend gives the same batch contract."""

    backend: Literal["dali", "torch", "synthetic"] = "dali"
    device: Literal["cpu", "gpu"] = "cpu"
    shards: str = Field("runs/shards", description="shard directory written by `agescale shard`")
    image_size: int = Field(112, ge=16, le=1024)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    eval_crop_pct: float = Field(1.0, gt=0, le=1, description="eval: resize shorter side to size/crop_pct, centre crop")
    workers: int | None = Field(None, ge=0, description="DALI threads / DataLoader workers; default: all cores (DALI: cores + 1)")
    seed: int = Field(0, ge=0, description="epoch order and augmentation seed")
    on_bad_sample: Literal["error", "skip"] = "error"
    augment_ops: Literal["auto", "fused", "dali"] = Field(
        "auto", description="dali backend, training: after the resize, augment with one fused Numba kernel "
        "(CPU only) or with DALI's operators; auto: fused on cpu, dali on gpu")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    augment: AugmentPolicy = Field(default_factory=AugmentPolicy)
    progressive: ProgressiveResize = Field(default_factory=ProgressiveResize)

    @model_validator(mode="after")
    def _fused_is_cpu_only(self) -> "LoaderConfig":
        if self.augment_ops == "fused" and self.device == "gpu":
            raise ValueError("augment_ops=fused runs on the CPU only; use augment_ops=dali (or auto) with device=gpu")
        if min(self.std) <= 0:  # the normalisation divides by it
            raise ValueError(f"std {list(self.std)}: every channel's std must be > 0")
        if not all(0 <= m <= 1 for m in self.mean):
            raise ValueError(f"mean {list(self.mean)}: channel means are fractions of 255, between 0 and 1")
        return self


class DataConfig(Strict):
    labels: LabelConfig = Field(default_factory=LabelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
