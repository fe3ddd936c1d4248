"""Several trained models, and optionally each image's mirror, combined: each member's
decoded age, its age distribution (when every member has one) and its gender probability are
averaged over members and views. One model with `hflip=True` is flip test-time augmentation;
`torch.onnx` exports the same module, so evaluate, export and predict compute one thing."""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.model import AgeModel


class Ensemble(nn.Module):
    def __init__(self, models: list[AgeModel], hflip: bool = False):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        ranges = {(m.method.min_age, m.method.max_age) for m in models}
        if len(ranges) > 1:
            raise ValueError(f"ensemble members use different age ranges: {sorted(ranges)}")
        self.members = nn.ModuleList(models)
        self.ages = models[0].method.ages
        self.min_age, self.max_age = models[0].method.min_age, models[0].method.max_age
        self.hflip = hflip

    def forward(self, x: torch.Tensor, body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"age": (N,), "distribution": (N, K) or absent, "gender_prob": (N,) or absent}.
        `body` (a second crop, MiVOLO) is mirrored with the face."""
        views = [(x, body)] + ([(x.flip(3), None if body is None else body.flip(3))] if self.hflip else [])
        dists, ages, genders = [], [], []
        for m in self.members:
            for v, b in views:
                out = m(v) if b is None else m(v, b)
                age_out = out["age"].float()
                ages.append(m.method.estimate(age_out))
                dists.append(m.method.distribution(age_out))
                if "gender" in out:
                    genders.append(torch.sigmoid(out["gender"].float()))
        result = {"age": torch.stack(ages).mean(0)}
        if all(d is not None for d in dists):
            result["distribution"] = torch.stack(dists).mean(0)
        if genders:
            result["gender_prob"] = torch.stack(genders).mean(0)
        return result

    @torch.no_grad()
    def predict(self, x: torch.Tensor, body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self(x, body)
