"""`agescale bench loader`: images/s of each loader backend on shards of the shared images.

Backends dali (CPU) and torch, at 112 and 224 px, with the default augmentation (train) and
with none (the eval transform: decode + resize + normalise), all in one run on the same
cores. DALI's CPU mode augments with the fused kernel (`augment_ops=auto`); the row
`dali-cpu-ops` runs DALI's own operators instead (the GPU path's graph), to show what the
kernel is worth. `ratio` = DALI-CPU / torch with the default augmentation at 112 px (`target`
2.0); `dali_augment_vs_decode_resize` = DALI with augmentation / DALI decode+resize alone
(target 0.8).

These machines share their cores with others, and one measurement moves by up to ±15 %. So
every configuration is measured `rounds` times, interleaved, and the median is reported
(with every round). The first batch of each measurement (pipeline and worker start-up) is
not timed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

from base.errors import UserError
from bench.common import machine
from data_pipeline.config import DataConfig
from data_pipeline.loaders import create_loader
from data_pipeline.shard import shard_datasets

# (row name, backend, augment_ops, device)
BACKENDS = (("dali-cpu", "dali", "auto", "cpu"), ("dali-cpu-ops", "dali", "dali", "cpu"), ("torch", "torch", "auto", "cpu"))
# --gpu: DALI's production path, `mixed` (nvJPEG) decode and its augmentation operators on the GPU.
GPU_BACKENDS = (("dali-gpu", "dali", "dali", "gpu"),)


def _rate(cfg: DataConfig, train: bool, batches: int) -> float:
    loader = create_loader(cfg, "train", train=train)
    it = iter(loader)
    next(it)
    t, n = time.perf_counter(), 0
    for b in islice(it, batches):
        n += len(b["key"])
    return n / (time.perf_counter() - t)


def _configs(shards: Path, batch: int, gpu: bool = False):
    for size in (112, 224):
        for name, backend, ops, device in BACKENDS + (GPU_BACKENDS if gpu else ()):
            for train in (True, False):
                if ops == "dali" and not train and device == "cpu":
                    continue  # without augmentation the two DALI CPU rows are the same pipeline
                cfg = DataConfig()
                cfg.loader.shards, cfg.loader.backend, cfg.loader.augment_ops = str(shards), backend, ops
                cfg.loader.device = device
                cfg.loader.image_size, cfg.loader.batch_size = size, batch
                yield {"backend": name, "size": size, "augment": "default" if train else "none"}, cfg, train


def run(src: Path, shards: Path | None = None, images: int = 2400, batch: int = 64, rounds: int = 3,
        gpu: bool = False) -> dict:
    if rounds < 1:
        raise UserError(f"--rounds {rounds}: at least 1")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA device visible")
    with tempfile.TemporaryDirectory(prefix="agescale-bench-") as tmp:
        if shards is None:
            if not src.is_dir():
                raise UserError(f"--src {src}: no such folder")
            shards = Path(tmp) / "shards"
            shard_datasets([("utkface", src)], shards, DataConfig().model_copy(deep=True))
        configs = list(_configs(shards, batch, gpu))
        runs = [[] for _ in configs]
        for _ in range(rounds):
            for i, (_, cfg, train) in enumerate(configs):
                runs[i].append(round(_rate(cfg, train, max(1, images // batch)), 1))
    rows = [{**row, "img_s": statistics.median(r), "rounds": r} for (row, _, _), r in zip(configs, runs)]
    get = {(r["backend"], r["size"], r["augment"]): r["img_s"] for r in rows}
    ratio = get[("dali-cpu", 112, "default")] / get[("torch", 112, "default")]
    aug = get[("dali-cpu", 112, "default")] / get[("dali-cpu", 112, "none")]
    return {"benchmark": "loader", "images_per_run": images, "batch": batch, "rounds": rounds, "results": rows,
            "ratio": round(ratio, 3), "target": 2.0, "meets_target": ratio >= 2.0,
            "dali_augment_vs_decode_resize": round(aug, 3), "dali_augment_vs_decode_resize_target": 0.8,
            "meets_augment_target": aug >= 0.8,
            "fused_kernel_vs_dali_operators": round(get[("dali-cpu", 112, "default")]
                                                    / get[("dali-cpu-ops", 112, "default")], 3),
            **({"gpu_vs_dali_cpu": round(get[("dali-gpu", 112, "default")] / get[("dali-cpu", 112, "default")], 3)}
               if gpu else {}),
            "machine": machine()}
