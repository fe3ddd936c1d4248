"""`agescale bench train`: the trainer's step time against a bare PyTorch loop.

Same model, batch, synthetic data and thread count, in one process: the bare loop is forward,
multi-task loss, backward, clipping and AdamW; the trainer is `agescale train` with the
synthetic backend (a real DeepSpeed engine, the loader, logging, the LR schedule). Each is
measured `rounds` times, interleaved (bare, trainer, bare, trainer, ...) so that drifting load
on a shared machine hits both alike, and the medians are compared: `ratio` = trainer / bare
(`target` 1.05). With `compiled`, two more rows: the bare loop and the trainer with
`torch.compile`; `compiled_ratio` = compiled trainer / eager bare loop (what compiling buys
end to end). With `autocast`, two more: both under bf16 autocast (the trainer with
`train.precision=bf16_autocast`, the bare loop inside `torch.autocast`); `autocast_ratio` =
autocast trainer / autocast bare loop, `autocast_speedup` = fp32 trainer / autocast trainer.
The first steps of each measurement are warm-up (and compilation), not timed.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from base.errors import UserError
from bench.common import machine
from trainer.losses import multitask_loss
from trainer.models import create_model
from trainer.run_config import load_config
from trainer.schedule import make_optimizer

WARMUP, LOG = 10, 10


def _bare(cfg, steps: int, compiled: bool = False, autocast: bool = False) -> float:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)  # as the trainer does
    model = create_model(cfg.model, cfg.data.loader.image_size)
    opt = make_optimizer(model, cfg.train.optimizer)
    forward = torch.compile(model) if compiled else model
    n, s = cfg.data.loader.batch_size, cfg.data.loader.image_size
    batch = {"image": torch.randn(n, 3, s, s), "age": torch.rand(n) * 90, "gender": torch.randint(0, 2, (n,)),
             "race": torch.randint(0, 5, (n,)), "valid": torch.ones(n, dtype=torch.bool)}
    for i in range(WARMUP + steps):
        if i == WARMUP:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(batch["image"])
        loss = multitask_loss(out, batch, model.method, cfg.model)["loss"]  # in fp32, as in the trainer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
    return (time.perf_counter() - t) / steps


def _trainer(cfg, steps: int) -> float:
    from trainer.train import train

    train(cfg)
    lines = [json.loads(l) for l in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [l["images_per_s"] for l in lines if l["phase"] == "train" and l["step"] > WARMUP]
    return cfg.data.loader.batch_size / statistics.median(rates)


def run(image_size: int = 64, batch: int = 32, steps: int = 40, rounds: int = 3, compiled: bool = False,
        autocast: bool = False) -> dict:
    if rounds < 1 or steps < 1:
        raise UserError(f"--rounds {rounds} / --steps {steps}: each must be at least 1")
    steps = max(LOG, steps // LOG * LOG)
    rows = {"bare": [], "trainer": []} | ({"bare_compiled": [], "trainer_compiled": []} if compiled else {}) | (
        {"bare_autocast": [], "trainer_autocast": []} if autocast else {})
    with tempfile.TemporaryDirectory(prefix="agescale-bench-") as tmp:
        def cfg_for(i: int, name: str, extra=()):
            return load_config(None, [
                "data.loader.backend=synthetic", f"data.loader.image_size={image_size}",
                f"data.loader.batch_size={batch}", f"train.run_dir={tmp}/{name}-{i}",
                f"train.max_steps={WARMUP + steps}", f"train.log_every_steps={LOG}", "train.test_at_end=false",
                "train.calibrate=false", "train.ckpt_every_steps=100000", "train.val_every_steps=100000",
                "train.optimizer.warmup_steps=0", *extra])
        for i in range(rounds):
            rows["bare"].append(_bare(cfg_for(i, "bare"), steps))
            rows["trainer"].append(_trainer(cfg_for(i, "trainer"), steps))
            if compiled:
                rows["bare_compiled"].append(_bare(cfg_for(i, "bare_c"), steps, compiled=True))
                rows["trainer_compiled"].append(_trainer(cfg_for(i, "trainer_c", ["train.compile=true"]), steps))
            if autocast:
                rows["bare_autocast"].append(_bare(cfg_for(i, "bare_a"), steps, autocast=True))
                rows["trainer_autocast"].append(_trainer(cfg_for(i, "trainer_a", ["train.precision=bf16_autocast"]),
                                                         steps))
        cfg = cfg_for(0, "x")  # the model and method the rows measured
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {"benchmark": "train", "model": cfg.model.backbone, "method": cfg.model.method, "image_size": image_size,
           "batch": batch, "steps_timed": steps, "rounds": rounds, "threads": torch.get_num_threads(),
           "results": [{"row": k, "step_s": round(med[k], 4), "img_s": round(batch / med[k], 1),
                        "rounds_step_s": [round(x, 4) for x in v]} for k, v in rows.items()],
           "bare_step_s": round(med["bare"], 4), "trainer_step_s": round(med["trainer"], 4),
           "ratio": round(med["trainer"] / med["bare"], 3), "target": 1.05,
           "meets_target": med["trainer"] / med["bare"] <= 1.05}
    if compiled:
        out["compiled_ratio"] = round(med["trainer_compiled"] / med["bare"], 3)
        out["compiled_vs_eager_trainer"] = round(med["trainer_compiled"] / med["trainer"], 3)
    if autocast:
        out["autocast_ratio"] = round(med["trainer_autocast"] / med["bare_autocast"], 3)
        out["autocast_speedup"] = round(med["trainer"] / med["trainer_autocast"], 3)
    return out | {"machine": machine()}
