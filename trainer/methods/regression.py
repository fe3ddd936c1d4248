"""Direct regression of the age: one output, read as center + scale * output so that a fresh
head starts near typical ages. L1, L2 (MSE) and smooth L1 losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.methods import AgeMethod, register_method

CENTER, SCALE = 35.0, 20.0


class _Regression(AgeMethod):
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
