"""`agescale bench loader`: images/s of each loader backend on shards of the shared images.

Backends dali (CPU) and torch, at 112 and 224 px, with the default augmentation (train) and
with none (the eval transform: decode + resize + normalise), all in one run on the same
cores. `ratio` = DALI-CPU / torch with the default augmentation at 112 px (`target` 2.0);
`dali_augment_vs_decode_resize` = DALI with augmentation / DALI decode+resize alone
(target 0.8). The first batch of each run (pipeline and worker start-up) is not timed.
"""

from __future__ import annotations

import tempfile
import time
from itertools import islice
from pathlib import Path

from bench.common import machine
from data_pipeline.config import DataConfig
from data_pipeline.loaders import create_loader
from data_pipeline.shard import shard_datasets
from launch.errors import UserError


def _rate(cfg: DataConfig, train: bool, batches: int) -> float:
    loader = create_loader(cfg, "train", train=train)
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for b in islice(it, batches):
        n += len(b["key"])
    return n / (time.perf_counter() - t)


def run(src: Path, shards: Path | None = None, images: int = 2400, batch: int = 64) -> dict:
    with tempfile.TemporaryDirectory(prefix="agescale-bench-") as tmp:
        if shards is None:
            if not src.is_dir():
                raise UserError(f"--src {src}: no such folder")
            shards = Path(tmp) / "shards"
            shard_datasets([("utkface", src)], shards, DataConfig().model_copy(deep=True))
        rows = []
        for size in (112, 224):
            for backend in ("dali", "torch"):
                for train in (True, False):
                    cfg = DataConfig()
                    cfg.loader.shards, cfg.loader.backend = str(shards), backend
                    cfg.loader.image_size, cfg.loader.batch_size = size, batch
                    rows.append({"backend": "dali-cpu" if backend == "dali" else "torch", "size": size,
                                 "augment": "default" if train else "none",
                                 "img_s": round(_rate(cfg, train, images // batch), 1)})
    get = {(r["backend"], r["size"], r["augment"]): r["img_s"] for r in rows}
    ratio = get[("dali-cpu", 112, "default")] / get[("torch", 112, "default")]
    aug = get[("dali-cpu", 112, "default")] / get[("dali-cpu", 112, "none")]
    return {"benchmark": "loader", "images_per_run": images, "batch": batch, "results": rows,
            "ratio": round(ratio, 3), "target": 2.0, "meets_target": ratio >= 2.0,
            "dali_augment_vs_decode_resize": round(aug, 3), "dali_augment_vs_decode_resize_target": 0.8,
            "machine": machine()}
