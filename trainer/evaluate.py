"""Run a model (with its test-time augmentation) over an evaluation loader: metrics reduced
across ranks, and the per-face predictions that the interval calibration is fitted on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer import calibration
from trainer.metrics import AgeMetrics
from trainer.models import Ensemble


def _batches(model, loader, device: torch.device, tta: str, channels_last: bool = False):
    was_training = model.training
    model.eval()
    predictor = Ensemble.for_tta([model], tta)
    try:
        with torch.no_grad():
            for batch in loader:
                views = [batch[k].to(device, non_blocking=True) for k in ("image", "body") if k in batch]
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                yield batch, predictor(*views), predictor
    finally:
        model.train(was_training)


def evaluate(model, loader, device: torch.device, tta: str = "none", calibration_rule: dict | None = None,
             channels_last: bool = False) -> dict:
    metrics = AgeMetrics(calibration=calibration_rule)
    for batch, res, predictor in _batches(model, loader, device, tta, channels_last):
        metrics.update(res["age"], batch["age"], gender=batch["gender"], gender_prob=res.get("gender_prob"),
                       race=batch["race"], valid=batch["valid"], distribution=res.get("distribution"),
                       ages=predictor.ages)
    metrics.reduce()
    return metrics.compute()


def fit_interval(model, loader, device: torch.device, tta: str = "none", level: float = 0.9,
                 channels_last: bool = False) -> dict:
    """Split-conformal calibration of the interval on `loader` (every rank's faces gathered)."""
    preds, ages, scales = [], [], []
    for batch, res, predictor in _batches(model, loader, device, tta, channels_last):
        keep = batch["valid"].bool()
        pred = res["age"].double().cpu()
        scale = calibration.spread(res.get("distribution"), predictor.ages, len(pred))
        preds.append(pred[keep]), ages.append(batch["age"].double()[keep]), scales.append(scale[keep])
    mine = [torch.cat(t) for t in (preds, ages, scales)]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        mine = [torch.cat([g[i] for g in gathered]) for i in range(3)]
    return calibration.fit(*mine, level=level)
