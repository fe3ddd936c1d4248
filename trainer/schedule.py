"""AdamW with decoupled weight decay (not on biases and norms), linear warmup, cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from trainer.config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def lr_factor(cfg: OptimConfig, step: int, total: int) -> float:
    """The learning rate at `step` of `total`, as a share of `cfg.lr`: linear warm-up, then cosine."""
    warm = min(cfg.warmup_steps, max(total - 1, 0))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | Callable[[], int]):
    """`total_steps` may be a callable: a run with a time budget fixes its length after its
    first timed epoch, and the cosine then fits the steps it chose."""
    total = total_steps if callable(total_steps) else (lambda: total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, total()))
