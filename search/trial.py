"""One Ray Tune trial = one real `trainer.train.train` run in `OUT/trials/<trial_id>/`.

With `resources.workers: 1` the trainer runs inside the trial's process and reports to Tune
directly (metrics + a Tune checkpoint after every validation, so PBT can copy it and a
restarted trial continues from it). With more workers the trial is a driver that builds a Ray
Train `TorchTrainer` (Ray Train v2's pattern for Tune); its workers run the same trainer under
the process group Ray Train sets up, all ranks report after every validation, and
`TuneReportCallback` forwards rank 0's metrics to Tune.

In both cases the trial's own DeepSpeed checkpoints are the source of truth for a restart
(crash retry, `agescale tune --resume`): the trainer resumes from `checkpoints/LATEST`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

ORIGIN = "tune_origin.json"  # written into a reported checkpoint: which trial and step it came from
ATTEMPTS = "attempts.jsonl"  # one line per start of a trial


def trial_dir(out: str, trial_id: str) -> Path:
    return Path(out) / "trials" / trial_id


def _install(tune_ckpt: Path, ckpt_root: Path, trial_id: str) -> None:
    """Make a checkpoint that Tune hands over (PBT's copy of a better trial, or this trial's own
    last report) this run's latest one, unless the run already has it or a later one of its own."""
    from trainer import checkpoint

    origin = json.loads((tune_ckpt / ORIGIN).read_text())
    own = checkpoint.latest(ckpt_root)
    if origin["trial_id"] == trial_id and own is not None and own >= origin["tag"]:
        return
    dst = ckpt_root / origin["tag"]
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tune_ckpt, dst)
    checkpoint.set_latest(ckpt_root, origin["tag"])


def _record_attempt(run_dir: Path) -> None:
    """One line per start of this trial (first run, crash retries, PBT exploits, --resume)."""
    from trainer import checkpoint

    with (run_dir / ATTEMPTS).open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "from_checkpoint": checkpoint.latest(run_dir / "checkpoints")}) + "\n")


def _run(cfg, trial_id: str, report) -> dict:
    """The trainer, resumed from the run's latest checkpoint if there is one."""
    from trainer import checkpoint
    from trainer.train import train

    ckpt_root = Path(cfg.train.run_dir) / "checkpoints"

    last = []

    def reporter(metrics: dict, tag_dir: Path | None) -> None:
        if tag_dir is not None:
            (tag_dir / ORIGIN).write_text(json.dumps({"trial_id": trial_id, "tag": tag_dir.name}) + "\n")
        if metrics["last_round"]:
            # A scheduler may end a trial at any report (ASHA at its last rung): the final round
            # is reported only after the trainer has calibrated, tested and written summary.json.
            last.append((metrics, tag_dir))
        else:
            report(metrics, tag_dir)

    summary = train(cfg, resume=checkpoint.latest(ckpt_root) is not None, reporter=reporter)
    for metrics, tag_dir in last:
        test = summary.get("test", {})
        report({**metrics, **({"test_mae": test["mae"]} if "mae" in test else {})}, tag_dir)
    return summary


def run_trial(params: dict, *, base: dict, out: str, workers: int, cpus_per_worker: float,
              gpus_per_worker: float, checkpoint_every: int = 1, variants: dict | None = None) -> None:
    """The Tune trainable (a function trainable; `params` are the sampled dotted keys). A Tune
    checkpoint goes with every `checkpoint_every`-th validation round (PBT: its perturbation
    interval, so a checkpoint it is about to copy is not rotated away by newer ones first)."""
    from ray import tune

    from search.spec import trial_config

    trial_id = tune.get_context().get_trial_id()
    run_dir = trial_dir(out, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    cfg = trial_config(base, params, run_dir, variants)
    if cfg.data.loader.workers is None:  # "all cores" would oversubscribe the trial's share
        cfg.data.loader.workers = max(1, int(cpus_per_worker))

    given = tune.get_checkpoint() if workers == 1 else None
    if given is not None:
        with given.as_directory() as d:
            _install(Path(d), run_dir / "checkpoints", trial_id)
    _record_attempt(run_dir)

    if workers == 1:

        def report(metrics: dict, tag_dir: Path | None) -> None:
            keep = tag_dir is not None and metrics["val_round"] % checkpoint_every == 0
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(tag_dir)) if keep else None)

        _run(cfg, trial_id, report)
        return

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from base.config import resolved

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": resolved(cfg), "trial_id": trial_id},
        torch_config=TorchConfig(backend="nccl" if cfg.train.device == "gpu" else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"CPU": cpus_per_worker, "GPU": gpus_per_worker}),
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=str(Path(out).resolve() / "ray_train"),
                             callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def _train_worker(loop_config: dict) -> None:
    """One Ray Train worker: the process group and RANK/WORLD_SIZE come from Ray Train."""
    import ray.train

    from trainer.run_config import Config

    def report(metrics: dict, tag_dir: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tag_dir)) if tag_dir else None)

    _run(Config.model_validate(loop_config["cfg"]), loop_config["trial_id"], report)
