"""DEX: cross-entropy over integer ages; the prediction is the softmax expectation."""

from __future__ import annotations

import torch.nn.functional as F

from trainer.methods import AgeMethod, register_method


@register_method
class Dex(AgeMethod):
    name, summary = "dex", "classification over ages, softmax expectation (DEX)"
    label_smoothing = 0.0
    _limits = {"label_smoothing": (0.0, 0.99)}

    def loss(self, out, age):
        return {"loss": F.cross_entropy(out.float(), self.age_index(age), label_smoothing=self.label_smoothing)}
