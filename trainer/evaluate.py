"""Run a model over an evaluation loader and reduce the metrics across ranks."""

from __future__ import annotations

import torch

from trainer.metrics import AgeMetrics


@torch.no_grad()
def evaluate(model, method, loader, device: torch.device) -> dict:
    was_training = model.training
    model.eval()
    metrics = AgeMetrics()
    for batch in loader:
        out = model(batch["image"].to(device, non_blocking=True))
        age_out = out["age"].float()
        metrics.update(method.predict(age_out), batch["age"], gender=batch["gender"],
                       gender_prob=torch.sigmoid(out["gender"].float()) if "gender" in out else None,
                       race=batch["race"], valid=batch["valid"], distribution=method.distribution(age_out),
                       ages=method.ages)
    metrics.reduce()
    model.train(was_training)
    return metrics.compute()
