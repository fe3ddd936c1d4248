"""`agescale bench shard`: sharding images/s against the floor of its work, a bare decode.

Every image is decode-checked at shard time, so one full decode per image (with the same
number of processes) is the least the sharder can do; `ratio` = agescale / bare decode,
`target` = 0.8. `tar cf` of the same files is reported for scale (no decode at all).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

from base.errors import UserError
from bench.common import best_of, machine
from data_pipeline.config import DataConfig
from data_pipeline.datasets.files import image_files
from data_pipeline.shard import shard_datasets


def _decode(path: Path) -> tuple[int, int]:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        im.load()
        return im.size


def run(src: Path, workers: int | None = None, repeats: int = 2) -> dict:
    if not src.is_dir():
        raise UserError(f"--src {src}: no such folder")
    files = list(image_files(src))
    if not files:
        raise UserError(f"--src {src}: no images")
    workers = workers or os.cpu_count() or 1
    cfg = DataConfig()
    cfg.shard.workers = workers
    with tempfile.TemporaryDirectory(prefix="agescale-bench-") as tmp:
        tmp = Path(tmp)
        t_tar = best_of(lambda: subprocess.run(["tar", "cf", str(tmp / "all.tar"), "-C", str(src), "."],
                                               check=True), repeats)

        def bare():
            with mp.get_context("fork").Pool(workers) as pool:
                for _ in pool.imap(_decode, files, chunksize=16):
                    pass

        t_decode = best_of(bare, repeats)
        t_shard = best_of(lambda: shard_datasets([("utkface", src)], tmp / "shards", cfg, overwrite=True), repeats)
    n = len(files)
    ours, floor = n / t_shard, n / t_decode
    return {
        "benchmark": "shard",
        "images": n,
        "processes": workers,
        "agescale_shard_img_s": round(ours, 1),
        "bare_decode_img_s": round(floor, 1),
        "tar_cf_img_s": round(n / t_tar, 1),
        "ratio": round(ours / floor, 3),
        "target": 0.8,
        "meets_target": ours / floor >= 0.8,
        "machine": machine(),
    }
