"""CORAL ordinal regression (Cao et al. 2020): K-1 binary tasks "age > k" that share one weight
vector and differ only in their biases, which makes the probabilities rank-consistent
(non-increasing in k). The prediction is min_age + the sum of the task probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.methods import AgeMethod, register_method


class CoralHead(nn.Module):
    def __init__(self, in_features: int, tasks: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.arange(tasks, 0, -1, dtype=torch.float32) / tasks)

    def forward(self, x):
        return self.fc(x) + self.bias


@register_method
class Coral(AgeMethod):
    name, summary = "coral", "CORAL ordinal regression, rank-consistent"

    @property
    def out_features(self) -> int:
        return self.num_ages - 1

    def head(self, in_features: int) -> nn.Module:
        return CoralHead(in_features, self.out_features)

    def levels(self, age):
        k = torch.arange(self.out_features, device=age.device)
        return (self.age_index(age)[:, None] > k[None]).float()

    def loss(self, out, age):
        return {"loss": F.binary_cross_entropy_with_logits(out.float(), self.levels(age), reduction="none")
                .sum(1).mean()}

    def predict(self, out):
        return self.min_age + torch.sigmoid(out.float()).sum(1)

    def distribution(self, out):
        """P(age = k) = P(> k-1) - P(> k), clipped at 0 (CORAL's P(> k) never increases)."""
        gt = torch.sigmoid(out.float())
        ones, zeros = torch.ones_like(gt[:, :1]), torch.zeros_like(gt[:, :1])
        cum = torch.cat([ones, gt, zeros], dim=1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0)
