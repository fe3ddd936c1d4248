"""Direct regression of the age: one output, read as center + scale * output so that a fresh
head starts near typical ages. L1, L2 (MSE) and smooth L1 losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.methods import AgeMethod, register_method

CENTER, SCALE = 35.0, 20.0


class _Regression(AgeMethod):
    has_distribution = False

    @property
    def out_features(self) -> int:
        return 1

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return CENTER + SCALE * out.float()[:, 0]

    def distribution(self, out: torch.Tensor) -> None:
        return None

    def _loss(self, pred: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, out, age):
        return {"loss": self._loss(self.predict(out), age.float())}


@register_method
class L1(_Regression):
    name, summary = "l1", "regression, mean absolute error"

    def _loss(self, pred, age):
        return F.l1_loss(pred, age)


@register_method
class L2(_Regression):
    name, summary = "l2", "regression, mean squared error"

    def _loss(self, pred, age):
        return F.mse_loss(pred, age)


@register_method
class SmoothL1(_Regression):
    name, summary = "smooth_l1", "regression, smooth L1 (Huber, beta 1 year)"

    def _loss(self, pred, age):
        return F.smooth_l1_loss(pred, age, beta=1.0)


@register_method
class RangeL2(_Regression):
    """MiVOLO's target: the age normalised to the configured range, (age - mid) / (max - min),
    regressed with a squared error in those units (so the head's output *is* the normalised age)."""

    name, summary = "l2_range", "regression of (age - mid) / (max - min), squared error (MiVOLO's target)"

    def predict(self, out):
        return (self.min_age + self.max_age) / 2 + (self.max_age - self.min_age) * out.float()[:, 0]

    def _loss(self, pred, age):
        return F.mse_loss(pred, age) / (self.max_age - self.min_age) ** 2


@register_method
class GaussianBlend(_Regression):
    """SwinFace's age loss as we read it: a squared error early in training that blends, over
    `blend_until` of the run, into a bounded Gaussian-shaped loss 1 - exp(-e^2 / (2 sigma^2)),
    which stops large errors (mislabelled faces) from dominating once the model is close. The
    squared error is in units of the head's scale (20 years) so both parts start near 1."""

    name, summary = "gaussian_blend", "regression, squared error blended into a bounded Gaussian loss (SwinFace)"
    sigma = 5.0
    blend_until = 1.0
    _limits = {"sigma": (0.5, 50.0), "blend_until": (0.01, 1.0)}

    def _loss(self, pred, age):
        t = min(1.0, self.progress / self.blend_until)
        err = pred - age
        squared = (err / SCALE).pow(2).mean()
        bounded = (1 - torch.exp(-err.pow(2) / (2 * self.sigma ** 2))).mean()
        return (1 - t) * squared + t * bounded
