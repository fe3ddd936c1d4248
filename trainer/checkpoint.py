"""Checkpoints: DeepSpeed's own format per tag, made atomic by a pointer file.

DeepSpeed writes `checkpoints/<tag>/`; only after every rank has finished does rank 0 write
`<tag>/agescale.json` (world size, ZeRO stage, step, and every file's size and sha256) and
point `checkpoints/LATEST` at the tag (a temporary file, renamed), so a crash during a save
leaves the previous checkpoint as the latest. Older tags beyond `keep` are removed after. A
resume takes the newest checkpoint whose files all match their sizes and checksums, whatever
`LATEST` says, and says why it skipped newer ones (`resumable`).

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
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from data_pipeline.shard import sha256_file

POINTER = "LATEST"
TAG = re.compile(r"step\d{8}")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


META = "agescale.json"


def _files(tag_dir: Path) -> dict[str, dict]:
    return {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != META}


def damage(ckpt_root: Path, tag: str) -> str | None:
    """Why `tag` cannot be resumed from (a missing, truncated or altered file), or None when
    every file matches the sizes and sha256 written at save time."""
    tag_dir = ckpt_root / tag
    try:
        info = json.loads((tag_dir / META).read_text())
    except (OSError, ValueError) as e:
        return f"{tag_dir / META}: missing or unreadable ({type(e).__name__}), so the save never finished"
    for name, want in info.get("files", {}).items():  # checkpoints from before checksums: no list
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, {want['bytes']} when saved (truncated or altered)"
        if sha256_file(path) != want["sha256"]:
            return f"{path}: sha256 differs from the one written at save time"
    return None


def resumable(ckpt_root: Path) -> tuple[str | None, list[str]]:
    """The newest intact checkpoint and, for the user, why newer candidates were skipped.
    `LATEST` names the preferred tag; when it is unreadable, dangling or names a damaged
    checkpoint, every `step*` folder is tried from the newest step down."""
    notes, tried = [], set()
    pointer = ckpt_root / POINTER
    candidates = []
    if pointer.exists():
        text = pointer.read_text(errors="replace").strip()
        if TAG.fullmatch(text) and (ckpt_root / text).is_dir():
            candidates.append(text)
        else:
            notes.append(f"{pointer}: names {text[:40]!r}, which is no checkpoint here")
    candidates += sorted((p.name for p in ckpt_root.glob("step*") if p.is_dir() and TAG.fullmatch(p.name)),
                         reverse=True)
    for tag in candidates:
        if tag in tried:
            continue
        tried.add(tag)
        why = damage(ckpt_root, tag)
        if why is None:
            return tag, notes
        notes.append(f"skipped {tag}: {why}")
    return None, notes


def latest(ckpt_root: Path) -> str | None:
    """The checkpoint a resume continues from: the newest intact one (see `resumable`)."""
    return resumable(ckpt_root)[0]
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


def shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _own(ckpt_root: Path, run_id: str) -> list[str]:
    """This run's finished checkpoints, oldest first: the only ones rotation may delete."""
    tags = []
    for p in sorted(ckpt_root.glob("step*")):
        if p.is_dir() and TAG.fullmatch(p.name):
            with contextlib.suppress(OSError, ValueError):
                if json.loads((p / META).read_text()).get("run_id") == run_id:
                    tags.append(p.name)
    return tags


def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int, rank: int, run_id: str) -> str:
    """Save `step`; then delete this run's oldest checkpoints beyond `keep`. A checkpoint of
    another run (another `run_id`), an unfinished save or one from before run ids is never
    deleted here."""
    tag = tag_of(step)
    if rank == 0:  # a conversion of an earlier checkpoint that had this tag is stale now
        shutil.rmtree(ckpt_root / UNIVERSAL / tag, ignore_errors=True)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if rank == 0:
        tmp = ckpt_root / tag / (META + ".tmp")  # written last, with every file's size and sha256
        tmp.write_text(json.dumps({
            "step": step, "run_id": run_id, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "zero_stage": engine.zero_optimization_stage(), "bf16_weights": engine.bfloat16_enabled(),
            "shapes": shapes(engine.module),
            "files": _files(ckpt_root / tag)}) + "\n")
        os.replace(tmp, ckpt_root / tag / META)
        set_latest(ckpt_root, tag)
        for old in _own(ckpt_root, run_id)[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_root / old, ignore_errors=True)
    _barrier()
    return tag


def adopt(ckpt_root: Path, tag: str, run_id: str) -> None:
    """Record `tag` (the checkpoint a resume continues from, maybe a PBT copy from another
    trial) as this run's, so rotation may retire it once newer ones exist."""
    path = ckpt_root / tag / META
    info = json.loads(path.read_text())
    if info.get("run_id") != run_id:
        info["run_id"] = run_id
        tmp = path.with_name(META + ".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, path)


SET_ASIDE = "set_aside"


def set_aside_newer(ckpt_root: Path, step: int) -> list[str]:
    """Before a resume from `step` trains on, move every checkpoint folder of a later step (a
    damaged save, or one LATEST did not name) to `checkpoints/set_aside/`: the resumed run
    would otherwise write into the same tags. Nothing is deleted; returns what was moved."""
    moved = []
    for p in sorted(ckpt_root.glob("step*")):
        if p.is_dir() and TAG.fullmatch(p.name) and int(p.name[4:]) > step:
            dest = ckpt_root / SET_ASIDE / p.name
            while dest.exists():
                dest = dest.with_name(dest.name + "+")
            dest.parent.mkdir(exist_ok=True)
            os.replace(p, dest)
            shutil.rmtree(ckpt_root / UNIVERSAL / p.name, ignore_errors=True)
            moved.append(f"{p} -> {dest}")
    return moved


def architecture_change(info: dict, module, old_cfg: dict | None, new_cfg: dict) -> str | None:
    """What differs between the model a checkpoint holds and the one the config builds, for a
    one-line error (None when the parameter shapes agree, or the checkpoint predates them)."""
    if "shapes" not in info:
        return None
    old, new = info["shapes"], shapes(module)
    if old == new:
        return None
    keys = [f"{k}: {old_cfg[k]!r} -> {new_cfg[k]!r}" for k in sorted(new_cfg)
            if old_cfg is not None and k in old_cfg and old_cfg[k] != new_cfg[k]]
    missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    shape = next((f"{k} {old[k]} -> {new[k]}" for k in sorted(set(old) & set(new)) if old[k] != new[k]), None)
    detail = "; ".join(filter(None, [
        f"{len(missing)} tensors gone (e.g. {missing[0]})" if missing else None,
        f"{len(extra)} new tensors (e.g. {extra[0]})" if extra else None,
        f"shape {shape}" if shape else None]))
    return (", ".join(keys) or "the model config") + f" ({detail})"


def load(engine, ckpt_root: Path, tag: str) -> dict:
    """Load `tag` from `ckpt_root` (the universal folder when the engine loads universal ones)."""
    _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    return client_state or {}
