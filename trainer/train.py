"""The one training function: `agescale train`, torchrun, SLURM and each Ray Tune trial call it.

Flow: process group (gloo/nccl) → loaders → model → DeepSpeed engine (ZeRO 0-2, fp32/bf16,
accumulation, clipping, AdamW, warmup + cosine) → resume from the latest checkpoint if asked
→ steps, with validation every epoch (and every N steps), the best model kept by validation
MAE, checkpoints every N steps and at the end → test of the best model.
SIGTERM or SIGUSR1 (SLURM preemption, time limit) → a checkpoint, then exit code 75.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from base.errors import UserError
from cluster.env import detect
from data_pipeline.loaders import create_loader
from data_pipeline.shard import MANIFEST, load_manifest
from trainer import budget, calibration, checkpoint
from trainer.distributed import all_true, init, rank0_value
from trainer.ds_config import deepspeed_config
from trainer.evaluate import evaluate, fit_interval
from trainer.losses import multitask_loss
from trainer.mixup import mix_images, mixed_loss, mixup_pairs
from trainer.models import create_model
from trainer.models.ensemble import TTA_VIEWS
from trainer.precision import PRECISIONS, flag_names, native_bf16
from trainer.precision import resolve as resolve_precision
from trainer.run_log import RunLog
from trainer.schedule import lr_factor, make_optimizer, make_schedule
from trainer.speed import compile_engine, make_ema, set_threads, to_channels_last

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; run again with --resume


class _Stop:
    """Set by SIGTERM/SIGUSR1; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested, self.signal = False, "a signal on another rank"
        if threading.current_thread() is threading.main_thread():  # Ray runs trials in a thread
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal = signal.Signals(signum).name


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Per-step seed: dropout & co. are reproducible after a resume without saving RNG state."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()[:8], "little") >> 1


def _check_splits(shards: Path, need: tuple[str, ...]) -> None:
    """Every split the run will read, checked before any compute (the test split is read only
    after the last step, hours in)."""
    have = load_manifest(shards)["splits"]
    empty = [s for s in need if not have.get(s, {}).get("count")]
    if empty:
        hint = " (or train.test_at_end=false)" if "test" in empty else ""
        counts = ", ".join(f"{k}={v.get('count')}" for k, v in have.items())
        raise UserError(f"data.loader.shards={shards}: no samples in split(s) {', '.join(empty)}, which the run needs "
                        f"(it has {counts}); reshard with --splits train=...,val=...,test=...{hint}")


def _model_config(cfg) -> dict:
    return {**{f"model.{k}": v for k, v in cfg.model.model_dump(mode="json").items()},
            "data.loader.image_size": cfg.data.loader.image_size}


def _saved_model_config(run_dir: Path) -> dict | None:
    """The model settings of the run's last start (config.yaml), to name what a resume changed."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        return {**{f"model.{k}": v for k, v in raw["model"].items()},
                "data.loader.image_size": raw["data"]["loader"]["image_size"]}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _agreed_precision(asked: str, device: str, rank: int) -> tuple[str, str]:
    """train.precision resolved on rank 0 and used by every rank (one job, one precision, even
    on nodes with different CPUs), with a warning where the choice will be slow."""
    precision, why = resolve_precision(asked, device)
    chosen = PRECISIONS[rank0_value(PRECISIONS.index(precision))]
    if chosen != precision:
        precision, why = chosen, f"{why}; rank 0 chose {chosen}"
    warn = logging.getLogger("agescale").warning
    if device == "cpu" and precision == "bf16":
        warn("train.precision=bf16 (bf16 weights) on CPU ran several times slower than fp32 on CPUs without "
             "native bf16; train.precision=auto or bf16_autocast is the CPU choice")
    elif device == "cpu" and precision == "bf16_autocast" and not native_bf16():
        warn(f"train.precision=bf16_autocast: this CPU has no native bf16 (no {flag_names()}), so bf16 is emulated: "
             "17-26x slower a step than fp32 on a 2-core AVX2 AMD EPYC; train.precision=auto picks fp32 here")
    if asked == "auto" and rank == 0:
        print(f"agescale: train.precision=auto: {precision} ({why.removeprefix('auto: ')})", file=sys.stderr)
    return precision, why


def train(cfg, resume: bool = False, reporter: Callable[[dict, Path | None], None] | None = None) -> dict:
    """Train as `cfg` says; returns the final summary (also written to run_dir/summary.json).

    `reporter` (Ray Tune, Ray Train) is called on every rank after each validation with the
    validation metrics and the checkpoint saved for that step (rank 0 only; None elsewhere), so a
    search can stop, pause, clone or resume the run at that point.
    """
    import deepspeed

    tc = cfg.train
    t_start = time.perf_counter()
    env = detect()
    if tc.device == "gpu" and not torch.cuda.is_available():
        raise UserError("train.device=gpu but no CUDA device is visible; use train.device=cpu")
    shards = Path(cfg.data.loader.shards)
    if cfg.data.loader.backend != "synthetic" and not (shards / MANIFEST).exists():
        raise UserError(f"data.loader.shards={shards}: no {MANIFEST} there (run `agescale shard ... --out {shards}`)")
    if cfg.data.loader.backend != "synthetic":
        _check_splits(shards, need=("train", "val", "test") if tc.test_at_end else ("train", "val"))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init(env, tc.device)
    rank, world = env.rank, env.world_size
    precision, precision_why = _agreed_precision(tc.precision, tc.device, rank)
    device = torch.device(f"cuda:{env.local_rank}" if tc.device == "gpu" else "cpu")
    set_threads(tc.threads)
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    run_dir = Path(tc.run_dir)
    ckpt_root = run_dir / "checkpoints"
    train_loader = create_loader(cfg.data, "train", rank, world)
    val_loader = create_loader(cfg.data, "val", rank, world, train=False)
    steps_per_epoch = len(train_loader) // tc.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"the train split gives {len(train_loader)} batches per rank, fewer than "
                        f"train.grad_accum={tc.grad_accum}: lower data.loader.batch_size")
    plan = budget.StepPlan(tc.max_steps or tc.epochs * steps_per_epoch)
    if tc.time_budget_min and budget.validations_before(plan.total, steps_per_epoch, tc.val_every_steps) < 2:
        logging.getLogger("agescale").warning(
            "train.time_budget_min=%s: the run validates fewer than twice before its last step, and the length is "
            "fitted at the second validation (the first epoch is not timed); set train.val_every_steps below %d "
            "steps to let the budget act", tc.time_budget_min, max(1, plan.total // 3))

    tag, notes = checkpoint.resumable(ckpt_root) if resume else (None, [])
    if rank == 0:
        if resume:  # later tags would be written over by this run: moved aside, never deleted
            notes += [f"set aside {m}" for m in checkpoint.set_aside_newer(ckpt_root, int(tag[4:]) if tag else 0)]
        for note in notes:
            print(f"agescale: resume: {note}", file=sys.stderr)
        if resume and tag is None:
            print(f"agescale: no intact checkpoint in {ckpt_root}; starting from scratch")
        elif tag and notes:
            print(f"agescale: resuming from {ckpt_root / tag}, the newest intact checkpoint", file=sys.stderr)
    saved = checkpoint.meta(ckpt_root, tag) if tag else {}
    if saved.get("bf16_weights", precision == "bf16") != (precision == "bf16"):  # before any conversion work
        # DeepSpeed's bf16 optimizer saves another layout than the fp32 one (fp32 <-> bf16_autocast is fine:
        # both keep fp32 weights and optimizer state)
        raise UserError(f"{ckpt_root / tag} was saved {'with' if saved['bf16_weights'] else 'without'} bf16 weights "
                        f"and this start trains in {precision} ({precision_why}); resume with train.precision="
                        f"{'bf16' if saved['bf16_weights'] else 'fp32'} on a machine that runs it")
    ds_config, load_root = deepspeed_config(tc, cfg.data.loader.batch_size, precision), ckpt_root
    if tag and checkpoint.needs_universal(saved, world, tc.zero_stage):
        load_root = checkpoint.to_universal(ckpt_root, tag, rank)
        ds_config["checkpoint"] = {"load_universal": True}

    model = create_model(cfg.model, cfg.data.loader.image_size)
    if tag:
        changed = checkpoint.architecture_change(saved, model,
                                                 _saved_model_config(run_dir), _model_config(cfg))
        if changed:
            raise UserError(f"{ckpt_root / tag} holds another model than this config builds: {changed}; "
                            "resume with the run's own model settings or train into a new train.run_dir")
    optimizer = make_optimizer(model, tc.optimizer)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_schedule(optimizer, tc.optimizer, lambda: plan.total),
        config=ds_config)
    method = model.method
    if world == 1 and engine.zero_optimization_stage() == 0:
        # One rank has no gradients to average, but DeepSpeed still flattens, all-reduces and
        # copies back every gradient (~16 ms of a 135 ms step on 2 cores, `bench train`).
        engine.enable_backward_allreduce = False
    if tc.channels_last:
        to_channels_last(engine, engine.zero_optimization_stage())
    ema = make_ema(engine.module, tc.ema_decay)
    if tc.compile:
        compile_engine(engine)
    eval_model = ema.module if ema is not None else engine.module

    def as_input(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if tc.channels_last else images

    step, best_mae, resumed_from, val_rounds, validated_at, skipped_before = 0, float("inf"), None, 0, -1, 0
    if tag:
        state = checkpoint.load(engine, load_root, tag)
        step, best_mae, resumed_from = state["step"], state["best_mae"], tag
        skipped_before = state.get("skipped_samples", 0)
        # A checkpoint taken at an epoch's last step, before that epoch's validation, validates
        # again after a resume; one taken after it does not.
        val_rounds, validated_at = state.get("val_rounds", 0), state.get("validated_at", -1)
        train_loader.load_state_dict(state["loader"])
        if state.get("budget_fitted"):  # the length a time budget chose: the schedule goes on as it was
            if tc.time_budget_min is None or state["total_steps"] < plan.total:
                logging.getLogger("agescale").warning(
                    "resume: keeping the %d steps that train.time_budget_min fitted before this checkpoint (the budget "
                    "given now, %s, is not re-applied)", state["total_steps"], tc.time_budget_min)
            plan.total, plan.fitted = min(state["total_steps"], plan.total), True
        if ema is not None:
            if "ema" not in state:
                raise UserError(f"{ckpt_root / tag}: saved without train.ema_decay, so it has no EMA weights "
                                "to resume; resume with train.ema_decay=null")
            ema.module.load_state_dict(state["ema"])
        # The config's learning rate wins over the checkpoint's (PBT changes it between resumes).
        scheduler.base_lrs = [tc.optimizer.lr for _ in scheduler.base_lrs]
    log = RunLog(run_dir, cfg, rank, world, plan.total, step, resumed_from, steps_per_epoch, validated_at,
                 start_details={"precision": precision, "precision_reason": precision_why})
    if tag and rank == 0:
        checkpoint.adopt(ckpt_root, tag, log.run_id)  # the checkpoint this run continues from is its own
    stop = _Stop()

    def client_state() -> dict:
        return {"step": step, "best_mae": best_mae, "loader": train_loader.state_dict(), "world_size": world,
                "val_rounds": val_rounds, "validated_at": validated_at,
                "skipped_samples": skipped_before + train_loader.skipped,
                "total_steps": plan.total, "budget_fitted": plan.fitted} | (
                    {"ema": ema.module.state_dict()} if ema is not None else {})

    saved_at = step if tag else -1

    def save() -> str:
        nonlocal saved_at
        if saved_at != step:
            checkpoint.save(engine, ckpt_root, step, client_state(), tc.keep_checkpoints, rank, log.run_id)
            saved_at = step
        return checkpoint.tag_of(step)

    def fit_budget(val_start: float, val_s: float) -> None:
        """train.time_budget_min: fix the run's length from its own step and validation times;
        once fixed, later validations re-fit it from the latest steps' times, shortening only."""
        nonlocal saved_at
        refit = plan.refits
        step_s = (plan.recent_step_seconds if refit else plan.step_seconds)(step, now=val_start)
        if step_s is None or step >= plan.total:  # too few steps timed yet (decide at the next one), or done
            return
        if refit:
            val_s = plan.recent_validation_seconds(val_s)
        passes = 2 if ema is not None and tc.ema_val_raw else 1
        end_s = budget.end_seconds(val_s, TTA_VIEWS[cfg.model.tta], tc.calibrate, tc.test_at_end, passes)
        # a Ray Tune trial runs in a worker process that may be older than the trial
        elapsed = time.perf_counter() - t_start if reporter is not None else budget.process_elapsed()
        timings = dict(elapsed_s=elapsed, step=step, step_s=step_s, val_s=val_s, end_s=end_s,
                       steps_per_epoch=steps_per_epoch, val_every_steps=tc.val_every_steps)
        budget_s = 60 * tc.time_budget_min
        if refit and budget.estimated_end(plan.total, **timings) <= budget.REFIT_AT * budget_s:
            total = plan.total  # still on time: keep the plan (noise does not shorten it)
        else:
            total = budget.fit_steps(budget_s=budget_s, max_total=plan.total, **timings)
        total = rank0_value(total)  # every rank calls it, whichever branch its own timings took
        planned = plan.total
        if refit and total >= planned:  # still fits (fit_steps never goes past max_total = planned)
            return
        plan.total, plan.fitted, plan.refits = total, True, True
        log.replan(step, total, {"time_budget_min": tc.time_budget_min, "planned_steps": planned,
                                 "epochs": round(total / steps_per_epoch, 2), "step_s": step_s,
                                 "val_s": val_s, "end_s": end_s, "elapsed_s": elapsed, "refit": refit})
        if refit:
            logging.getLogger("agescale").warning(
                "train.time_budget_min: steps now take %.3f s, so the run is shortened from %d to %d steps to end "
                "inside %s min", step_s, planned, total, tc.time_budget_min)
        if total == step + 1 and total < planned:
            logging.getLogger("agescale").warning(
                "train.time_budget_min=%s: %.0f s were spent by step %d, so the budget allows no more training; "
                "the run stops at the next step", tc.time_budget_min, elapsed, step)
        if saved_at == step:  # this step's checkpoint was written before the length was fixed: write it again
            saved_at = -1
            save()
        before, after = (lr_factor(tc.optimizer, step, n) for n in (planned, total))
        if not refit and abs(after / before - 1) > 0.01:
            logging.getLogger("agescale").warning(
                "train.time_budget_min: the length was fixed at step %d, after the warm-up (%d steps), so the "
                "learning rate changes there by %+.1f %%; a warm-up longer than two epochs avoids that", step,
                tc.optimizer.warmup_steps, 100 * (after / before - 1))

    def validate() -> None:
        nonlocal best_mae, validated_at, val_rounds
        if validated_at == step:
            return
        validated_at = step
        val_rounds += 1
        t_val = time.perf_counter()
        metrics = evaluate(eval_model, val_loader, device, channels_last=tc.channels_last)
        log.scalars("val", step, metrics)
        if ema is not None and tc.ema_val_raw:  # the raw weights too: an EMA A/B inside one run
            raw = evaluate(engine.module, val_loader, device, channels_last=tc.channels_last)
            log.scalars("val_raw", step, {k: v for k, v in raw.items() if isinstance(v, float)})
        if metrics.get("mae", float("inf")) < best_mae:
            best_mae = metrics["mae"]
            log.save_best(eval_model, metrics, step)
        if tc.time_budget_min and (plan.refits or not plan.fitted):
            fit_budget(t_val, time.perf_counter() - t_val)
        plan.validated(step, time.perf_counter() - t_val)
        if reporter is not None:
            tag_dir = ckpt_root / save()
            reporter({"val_round": val_rounds, "step": step, "epoch": round(step / steps_per_epoch, 3),
                      "last_round": step >= plan.total,
                      "best_val_mae": best_mae, **{f"val_{k}": v for k, v in metrics.items()}},
                     tag_dir if rank == 0 else None)

    engine.train()
    stopped, nonfinite = False, 0
    t0, seen = time.perf_counter(), 0
    while step < plan.total and not stopped:
        epoch, skipped_at_start = train_loader.epoch, train_loader.skipped
        micro = 0
        for batch in train_loader:
            torch.manual_seed(_step_seed(tc.seed, step, rank))
            method.set_progress(step / plan.total)
            images = [batch[k] for k in ("image", "body") if k in batch]
            labels = {k: batch[k].to(device) for k in ("age", "gender", "race", "valid")}
            mix = mixup_pairs(len(images[0]), tc.mixup.alpha, tc.mixup.prob)
            if mix is not None:
                images = [mix_images(x, *mix) for x in images]
            out = engine(*[as_input(x) for x in images])
            parts = multitask_loss(out, labels, method, cfg.model) if mix is None else \
                mixed_loss(lambda y: multitask_loss(out, y, method, cfg.model), labels, *mix)
            # Every rank skips a micro-batch whose loss is inf/nan on any rank (so none waits in a
            # collective); a streak of them stops the run before a diverged model is saved.
            if all_true(not bool(torch.isfinite(parts["loss"]))):
                nonfinite += 1
                if nonfinite >= tc.max_nonfinite_steps:
                    kept = checkpoint.latest(ckpt_root)
                    raise UserError(
                        f"training diverged: the loss was inf/nan for {nonfinite} consecutive batches after step "
                        f"{step} (train.max_nonfinite_steps={tc.max_nonfinite_steps}); none was applied; last "
                        f"checkpoint kept: {ckpt_root / kept if kept else 'none'}; lower train.optimizer.lr or "
                        "check the loss weights")
                continue
            nonfinite = 0
            engine.backward(parts["loss"])
            engine.step()
            seen += len(batch["key"]) * world
            micro += 1
            if micro % tc.grad_accum:
                continue
            step += 1
            if ema is not None:
                ema.update(engine.module, step=step)
            if step % tc.log_every_steps == 0 or step == plan.total:
                rate = seen / (time.perf_counter() - t0)
                log.scalars("train", step, {k: v.item() for k, v in parts.items()} |
                            {"lr": scheduler.get_last_lr()[0], "images_per_s": rate, "epoch": epoch})
                t0, seen = time.perf_counter(), 0
            log.progress(step)
            if tc.val_every_steps and step % tc.val_every_steps == 0:
                validate()
            if all_true(stop.requested):
                log.preempted(step, save(), stop.signal)
                raise SystemExit(EXIT_PREEMPTED)
            if step % tc.ckpt_every_steps == 0 and step < plan.total:
                save()
            if step >= plan.total:
                stopped = True
                break
        if train_loader.epoch != epoch or stopped:  # a full epoch, or the last step
            if validated_at != step:  # once per epoch end (a resume there validates again, this too)
                log.data_epoch(step, epoch, train_loader.skipped - skipped_at_start,
                               skipped_before + train_loader.skipped)
            validate()

    save()
    summary = {"steps": step, "best_val_mae": best_mae, "world_size": world,
               "param_checksums": log.param_checksums(engine.module), "skipped_samples": skipped_before + train_loader.skipped}
    rule = None
    if tc.calibrate or tc.test_at_end:
        log.load_best(eval_model)
    if not tc.calibrate and rank == 0:
        (run_dir / calibration.CALIBRATION).unlink(missing_ok=True)  # never an earlier run's rule
    if tc.calibrate:
        rule = fit_interval(eval_model, val_loader, device, cfg.model.tta, channels_last=tc.channels_last)
        rule["split"], rule["tta"], rule["decode"] = "val", cfg.model.tta, cfg.model.decode
        if rank == 0:
            calibration.save(rule, run_dir)
        summary["calibration"] = rule
    if tc.test_at_end:
        test_loader = create_loader(cfg.data, "test", rank, world, train=False)
        summary["test"] = evaluate(eval_model, test_loader, device, cfg.model.tta, rule,
                                   channels_last=tc.channels_last)
        log.scalars("test", step, summary["test"])
    log.finish(summary)
    return summary
