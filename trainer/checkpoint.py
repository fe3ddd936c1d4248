"""Checkpoints: DeepSpeed's own format per tag, made atomic by a pointer file.

DeepSpeed writes `checkpoints/<tag>/`; only after every rank has finished does rank 0 write
`<tag>/agescale.json` (world size, ZeRO stage, step) and point `checkpoints/LATEST` at the tag
(a temporary file, renamed), so a crash during a save leaves the previous checkpoint as the
latest. Older tags beyond `keep` are removed after.

World-size changes: ZeRO-1/2 partition the optimizer state by data-parallel rank, and
DeepSpeed refuses to load such a checkpoint at another world size. For that case rank 0
converts the checkpoint once with DeepSpeed's own `ds_to_universal` into
`checkpoints/universal/<tag>/`, and the engine is built with `checkpoint.load_universal`.
ZeRO-0 keeps the whole optimizer state in every checkpoint and loads at any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

POINTER = "LATEST"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest(ckpt_root: Path) -> str | None:
    pointer = ckpt_root / POINTER
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_root / tag).is_dir() else None


META = "agescale.json"
UNIVERSAL = "universal"


def meta(ckpt_root: Path, tag: str) -> dict:
    return json.loads((ckpt_root / tag / META).read_text())


def needs_universal(info: dict, world_size: int, zero_stage: int) -> bool:
    return info["world_size"] != world_size and max(info["zero_stage"], zero_stage) > 0


def to_universal(ckpt_root: Path, tag: str, rank: int) -> Path:
    """Convert `tag` (on rank 0, once); returns the folder to load from with load_universal."""
    out = ckpt_root / UNIVERSAL
    if rank == 0 and not (out / tag / "zero").is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out / tag, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal(argparse.Namespace(
                input_folder=str(ckpt_root / tag), output_folder=str(out / tag), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    _barrier()
    return out


def set_latest(ckpt_root: Path, tag: str) -> None:
    """Point LATEST at `tag`, atomically (a crash leaves the old pointer or the new one)."""
    tmp = ckpt_root / (POINTER + ".tmp")
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_root / POINTER)


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int, rank: int) -> str:
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if rank == 0:
        (ckpt_root / tag / META).write_text(json.dumps({
            "step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "zero_stage": engine.zero_optimization_stage()}) + "\n")
        set_latest(ckpt_root, tag)
        tags = sorted(p.name for p in ckpt_root.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_root / old, ignore_errors=True)
    _barrier()
    return tag


def load(engine, ckpt_root: Path, tag: str) -> dict:
    """Load `tag` from `ckpt_root` (the universal folder when the engine loads universal ones)."""
    _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    return client_state or {}
