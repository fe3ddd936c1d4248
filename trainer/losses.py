"""Multi-task loss: the age method's loss plus gender and race losses, each masked to the
samples whose label is known (and that are not padding), weighted from the config."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.methods import AgeMethod


def multitask_loss(out: dict[str, torch.Tensor], batch: dict, method: AgeMethod,
                   cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Parts and their weighted sum under "loss", always in fp32: under autocast
    (train.precision=bf16_autocast) the heads' outputs arrive in bf16."""
    out = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}  # no copy when fp32
    valid = batch.get("valid")
    valid = torch.ones_like(batch["age"], dtype=torch.bool) if valid is None else valid.to(batch["age"].device)
    zero = out["age"].sum() * 0.0
    parts: dict[str, torch.Tensor] = {}
    if valid.any():
        age_parts = method.loss(out["age"][valid], batch["age"][valid])
        parts.update({f"age_{k}" if k != "loss" else "age": v for k, v in age_parts.items()})
    else:
        parts["age"] = zero
    total = cfg.age_weight * parts["age"]
    if "gender" in out:
        known = valid & (batch["gender"] >= 0)
        parts["gender"] = F.binary_cross_entropy_with_logits(
            out["gender"][known], batch["gender"][known].float()) if known.any() else zero
        total = total + cfg.gender_weight * parts["gender"]
    if "race" in out:
        known = valid & (batch["race"] >= 0)
        parts["race"] = F.cross_entropy(out["race"][known], batch["race"][known]) if known.any() else zero
        total = total + cfg.race_weight * parts["race"]
    parts["loss"] = total
    return parts
