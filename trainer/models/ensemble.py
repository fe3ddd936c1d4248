"""Several trained models combined: age distributions (or ages, for methods without one) and
gender probabilities are averaged."""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.model import AgeModel


class Ensemble(nn.Module):
    def __init__(self, models: list[AgeModel]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        ranges = {(m.method.min_age, m.method.max_age) for m in models}
        if len(ranges) > 1:
            raise ValueError(f"ensemble members use different age ranges: {sorted(ranges)}")
        self.members = nn.ModuleList(models)
        self.ages = models[0].method.ages

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"age": (N,), "distribution": (N, K) or absent, "gender_prob": (N,) or absent}."""
        dists, ages, genders = [], [], []
        for m in self.members:
            out = m(x)
            d = m.method.distribution(out["age"])
            (dists if d is not None else ages).append(d if d is not None else m.method.predict(out["age"]))
            if "gender" in out:
                genders.append(torch.sigmoid(out["gender"]))
        result = {}
        if dists and not ages:
            dist = torch.stack(dists).mean(0)
            result["distribution"] = dist
            result["age"] = dist @ self.ages.to(dist)
        else:  # a regression member has no distribution: average the predicted ages
            all_ages = ages + [d @ self.ages.to(d) for d in dists]
            result["age"] = torch.stack(all_ages).mean(0)
        if genders:
            result["gender_prob"] = torch.stack(genders).mean(0)
        return result
