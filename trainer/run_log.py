"""Everything a run writes besides checkpoints; rank 0 writes, the other ranks only join in
collective calls. Run directory layout:

  config.yaml        the resolved config          run.json       manifest hash; per start: world size,
                                                                 step resumed from, precision chosen
  metrics.jsonl      one JSON line per log/val    tensorboard/   the same scalars for TensorBoard
  best/model.safetensors + best/metrics.json      the best model by validation MAE
  checkpoints/       DeepSpeed checkpoints + LATEST              summary.json   the final result
  preempted.json     present while the run is stopped by a signal (SLURM requeues on it)
  metrics.superseded.jsonl  rows a resume re-ran (moved out of metrics.jsonl, never deleted)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from base.config import resolved, save_yaml
from base.errors import UserError
from base.paths import out_dir
from data_pipeline.shard import MANIFEST

PREEMPTED = "preempted.json"


# What a run writes into its run directory: --overwrite removes these and nothing else (the
# demo keeps its shards under runs/demo/shards).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "calibration.json", PREEMPTED,
             "metrics.superseded.jsonl",
             "tensorboard", "checkpoints", "best")


def guard_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """A run directory that holds an earlier run is never trained into by accident (its best/,
    config and checkpoints would be overwritten or mixed): --resume continues it, --overwrite
    clears the run's files first, anything else is refused."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    out_dir(run_dir, label=f"train.run_dir={run_dir}")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise UserError(f"train.run_dir={run_dir} already holds a run ({', '.join(found)}): continue it with "
                        "--resume, clear it with --overwrite, or choose another train.run_dir")
    if int(os.environ.get("RANK", "0")) == 0:  # the other ranks meet rank 0 in a collective before writing
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class RunLog:
    def __init__(self, run_dir: Path, cfg, rank: int, world: int, total_steps: int, step: int,
                 resumed_from: str | None, steps_per_epoch: int | None = None, validated_at: int = -1,
                 start_details: dict | None = None):
        """`start_details`: what this start chose for itself (the resolved train.precision), kept
        per start in run.json because a resume on another machine may choose differently."""
        self.dir, self.rank, self.main = run_dir, rank, rank == 0
        self._tb = self._bar = self.run_id = None
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / PREEMPTED).unlink(missing_ok=True)
            save_yaml(resolved(cfg), run_dir / "config.yaml")
            manifest = Path(cfg.data.loader.shards) / MANIFEST
            info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
            self.run_id = info.setdefault("run_id", uuid.uuid4().hex)  # stamped into every checkpoint
            self._drop_superseded(step, validated_at)
            info.setdefault("starts", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "world_size": world,
                                                  "resumed_from": resumed_from, "step": step,
                                                  **(start_details or {})})
            info["data_manifest_sha256"] = (hashlib.sha256(manifest.read_bytes()).hexdigest()
                                            if manifest.exists() else None)
            info["total_steps"], info["steps_per_epoch"] = total_steps, steps_per_epoch
            _atomic_json(run_dir / "run.json", info)
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step or None)
            self._bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None)
        _barrier()

    def _drop_superseded(self, step: int, validated_at: int) -> None:
        """A resume from `step` re-runs what came after it: those metrics.jsonl rows move to
        metrics.superseded.jsonl, so metrics.jsonl reads as one run and nothing is lost. Rows of
        `step` itself stay when the checkpoint was taken after them (its training log, and its
        validation when the checkpoint says it was done)."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        keep, drop = [], []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                at, phase = int(row.get("step", 0)), row.get("phase")
            except (ValueError, TypeError, AttributeError):
                drop.append(line)
                continue
            ok = at < step or (at == step and (phase == "train" or (validated_at == step and phase != "test")))
            (keep if ok else drop).append(line)
        if drop:
            with (self.dir / "metrics.superseded.jsonl").open("a") as f:
                f.write("\n".join(drop) + "\n")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)
            print(f"agescale: resume: {len(drop)} metrics.jsonl rows after step {step} moved to "
                  f"{self.dir / 'metrics.superseded.jsonl'}", file=sys.stderr)

    def data_epoch(self, step: int, epoch: int, skipped: int, skipped_total: int) -> None:
        """Per epoch: samples replaced because they could not be decoded (on_bad_sample=skip)."""
        self.scalars("data", step, {"epoch": epoch, "skipped_samples": skipped, "skipped_total": skipped_total})
        if skipped and self._bar is not None:
            self._bar.write(f"epoch {epoch}: {skipped} undecodable samples skipped ({skipped_total} in the run)")

    def scalars(self, phase: str, step: int, values: dict) -> None:
        if not self.main:
            return
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"phase": phase, "step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{phase}/{k}", v, step)
        if phase not in ("train", "data") and self._bar is not None:
            self._bar.write(f"step {step} {phase}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)))

    def replan(self, step: int, total: int, details: dict) -> None:
        """A time budget fixed the run's length: metrics.jsonl (phase "budget"), run.json's
        total_steps and the progress bar say so."""
        self.scalars("budget", step, {"total_steps": total, **details})
        if self.main:
            info = json.loads((self.dir / "run.json").read_text())
            info["total_steps"] = total
            _atomic_json(self.dir / "run.json", info)
            self._bar.total = total
            self._bar.refresh()

    def progress(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def save_best(self, module: torch.nn.Module, metrics: dict, step: int) -> None:
        if self.main:
            best = self.dir / "best"
            best.mkdir(exist_ok=True)
            tmp = best / "model.safetensors.tmp"
            save_file({k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp))
            os.replace(tmp, best / "model.safetensors")
            _atomic_json(best / "metrics.json", {"step": step, **metrics})

    def load_best(self, module: torch.nn.Module) -> None:
        _barrier()
        path = self.dir / "best" / "model.safetensors"
        if path.exists():
            own = module.state_dict()
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in load_file(str(path)).items()})

    def param_checksums(self, module: torch.nn.Module) -> list[float]:
        """Each rank's parameter checksum: equal values mean the ranks stayed in sync."""
        mine = torch.tensor([sum(p.detach().double().sum().item() for p in module.parameters())])
        if not dist.is_initialized():
            return [mine.item()]
        out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(out, mine)
        return [t.item() for t in out]

    def finish(self, summary: dict) -> None:
        if self.main:
            _atomic_json(self.dir / "summary.json", summary)
        self.close()

    def preempted(self, step: int, tag: str, signal_name: str) -> None:
        """Stopped by SIGTERM/SIGUSR1 after a checkpoint: leave `preempted.json` for the job script
        (it requeues the job) and say so; the next start removes the file."""
        if self.main:
            _atomic_json(self.dir / PREEMPTED, {"step": step, "checkpoint": tag, "signal": signal_name,
                                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"agescale: stopped by {signal_name} at step {step}; checkpoint {tag} saved; exit code 75 "
                  f"(continue with --resume)", file=sys.stderr, flush=True)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
