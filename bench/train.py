"""`agescale bench train`: the trainer's step time against a bare PyTorch loop.

Same model, batch, synthetic data and thread count, in one run: the bare loop is forward,
multi-task loss, backward, AdamW step; the trainer is `agescale train` with the synthetic
backend (a real DeepSpeed engine, the loader, logging, the LR schedule). `ratio` = trainer
step time / bare step time, `target` = 1.05. The first steps of each are warm-up, not timed.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine
from launch.config import load_config
from trainer.losses import multitask_loss
from trainer.models import create_model
from trainer.schedule import make_optimizer

WARMUP, LOG = 10, 10


def _bare(cfg, steps: int) -> float:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)  # as the trainer does
    model = create_model(cfg.model, cfg.data.loader.image_size)
    opt = make_optimizer(model, cfg.train.optimizer)
    n, s = cfg.data.loader.batch_size, cfg.data.loader.image_size
    batch = {"image": torch.randn(n, 3, s, s), "age": torch.rand(n) * 90, "gender": torch.randint(0, 2, (n,)),
             "race": torch.randint(0, 5, (n,)), "valid": torch.ones(n, dtype=torch.bool)}
    for i in range(WARMUP + steps):
        if i == WARMUP:
            t = time.perf_counter()
        loss = multitask_loss(model(batch["image"]), batch, model.method, cfg.model)["loss"]
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
    return cfg.data.loader.batch_size / (sum(rates) / len(rates))


def run(image_size: int = 64, batch: int = 32, steps: int = 40) -> dict:
    steps = max(LOG, steps // LOG * LOG)
    with tempfile.TemporaryDirectory(prefix="agescale-bench-") as tmp:
        cfg = load_config(None, [f"data.loader.backend=synthetic", f"data.loader.image_size={image_size}",
                                 f"data.loader.batch_size={batch}", f"train.run_dir={tmp}/run",
                                 f"train.max_steps={WARMUP + steps}", f"train.log_every_steps={LOG}",
                                 "train.test_at_end=false", "train.ckpt_every_steps=100000",
                                 "train.val_every_steps=100000", "train.optimizer.warmup_steps=0"])
        bare = _bare(cfg, steps)
        ours = _trainer(cfg, steps)
    return {"benchmark": "train", "model": cfg.model.backbone, "method": cfg.model.method, "image_size": image_size,
            "batch": batch, "steps_timed": steps, "threads": torch.get_num_threads(),
            "bare_step_s": round(bare, 4), "trainer_step_s": round(ours, 4),
            "ratio": round(ours / bare, 3), "target": 1.05, "meets_target": ours / bare <= 1.05, "machine": machine()}
