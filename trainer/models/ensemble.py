"""Several trained models, and optionally each image's mirror and a zoomed view, combined: each
member's decoded age, its age distribution (when every member has one) and its gender probability
are averaged over members and views. One model with `hflip=True` is flip test-time augmentation;
`torch.onnx` exports the same module, so evaluate, export and predict compute one thing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.model import AgeModel

# `model.tta` modes and how many forward passes each costs per model.
TTA_VIEWS = {"none": 1, "hflip": 2, "hflip_zoom": 4}
# hflip_zoom's second scale: the central ZOOM x ZOOM of the evaluation crop, resized back to the
# input size. Training's random resized crops keep 0.8-1.0 of the area (side 0.89-1.0), so the
# zoomed view is a framing the model trained on. Chosen on the validation split (README, 2026-12-08:
# 0.95 took 0.047 +- 0.026 off the recipe's validation MAE with flip TTA; 0.9 and 0.85 raised it).
ZOOM = 0.95


def zoom(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central `fraction` of each image (per side), bilinearly resized back to its size.
    Done on the preprocessed tensor so that the ONNX graph holds it and serving needs no change."""
    h, w = x.shape[-2:]
    ch, cw = round(h * fraction), round(w * fraction)
    top, left = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


class Ensemble(nn.Module):
    def __init__(self, models: list[AgeModel], hflip: bool = False, zoom: float | None = None):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        ranges = {(m.method.min_age, m.method.max_age) for m in models}
        if len(ranges) > 1:
            raise ValueError(f"ensemble members use different age ranges: {sorted(ranges)}")
        self.members = nn.ModuleList(models)
        self.ages = models[0].method.ages
        self.min_age, self.max_age = models[0].method.min_age, models[0].method.max_age
        self.hflip, self.zoom = hflip, zoom

    @classmethod
    def for_tta(cls, models: list[AgeModel], tta: str = "none") -> "Ensemble":
        """The ensemble that computes `model.tta` mode `tta` (TTA_VIEWS)."""
        if tta not in TTA_VIEWS:
            raise ValueError(f"unknown test-time augmentation {tta!r}; one of {', '.join(TTA_VIEWS)}")
        return cls(models, hflip=tta != "none", zoom=ZOOM if tta == "hflip_zoom" else None)

    def forward(self, x: torch.Tensor, body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"age": (N,), "distribution": (N, K) or absent, "gender_prob": (N,) or absent}.
        `body` (a second crop, MiVOLO) is mirrored and zoomed with the face."""
        views = [(x, body)]
        if self.zoom is not None:
            views.append((zoom(x, self.zoom), None if body is None else zoom(body, self.zoom)))
        if self.hflip:
            views += [(v.flip(3), None if b is None else b.flip(3)) for v, b in views]
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
