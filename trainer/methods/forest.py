"""Deep regression forest (Shen et al., CVPR 2018): soft decision trees on the features.

Each of `trees` trees of depth `depth` has sigmoid split nodes fed by one linear layer; a
sample reaches every leaf with the product of the split probabilities on its path, and each
leaf holds a Gaussian over the age (mean, log-sigma). The age distribution is the mixture of
the leaves' Gaussians, averaged over trees; the prediction is its mean.

How leaves are updated: jointly with the split nodes, by gradient descent on the mixture's
negative log-likelihood of the true age. The paper alternates a variational-bounding fixed-
point update of the leaves with back-propagation through the splits; the joint gradient
update optimises the same likelihood and needs no pass over the training set per update,
which keeps the method inside the one training loop every method shares. Leaf means start
spread evenly over the age range, sigmas at a tenth of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.methods import AgeMethod, register_method


class ForestHead(nn.Module):
    def __init__(self, in_features: int, trees: int, depth: int, min_age: float, max_age: float):
        super().__init__()
        self.trees, self.depth, self.leaves = trees, depth, 2 ** depth
        self.splits = nn.Linear(in_features, trees * (self.leaves - 1))
        spread = torch.linspace(min_age, max_age, self.leaves)
        self.mu = nn.Parameter(spread.repeat(trees, 1) + torch.randn(trees, self.leaves))
        self.log_sigma = nn.Parameter(torch.full((trees, self.leaves), math.log((max_age - min_age) / 10)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Leaf probabilities (N, trees * leaves)."""
        d = torch.sigmoid(self.splits(x)).view(-1, self.trees, self.leaves - 1)
        route = torch.ones_like(d[:, :, :1])
        for level in range(self.depth):
            start = 2 ** level - 1
            dl = d[:, :, start:start + 2 ** level]
            route = torch.stack([route * dl, route * (1 - dl)], dim=3).flatten(2)
        return route.flatten(1)


@register_method
class DeepRegressionForest(AgeMethod):
    name, summary = "drf", "deep regression forest: soft trees with Gaussian leaves"
    trees, depth = 5, 5
    _limits = {"trees": (1, 64), "depth": (1, 10)}  # 2**depth leaves per tree

    def head(self, in_features: int) -> nn.Module:
        self.forest = ForestHead(in_features, self.trees, self.depth, self.min_age, self.max_age)
        return self.forest

    @property
    def out_features(self) -> int:
        return self.trees * 2 ** self.depth

    def _route(self, out):
        return out.float().view(-1, self.forest.trees, self.forest.leaves)

    def loss(self, out, age):
        route = self._route(out)
        sigma = self.forest.log_sigma.exp()
        y = age.float()[:, None, None]
        log_n = -0.5 * ((y - self.forest.mu) / sigma) ** 2 - self.forest.log_sigma - 0.5 * math.log(2 * math.pi)
        nll = -torch.logsumexp(torch.log(route.clamp_min(1e-12)) + log_n, dim=2)  # (N, trees)
        return {"loss": nll.mean()}

    def predict(self, out):
        return (self._route(out) * self.forest.mu).sum(2).mean(1)

    def distribution(self, out):
        route = self._route(out)
        ages = self.ages.to(route.device)[None, None, None]                      # (1,1,1,K)
        sigma = self.forest.log_sigma.exp()[None, :, :, None]
        dens = torch.exp(-0.5 * ((ages - self.forest.mu[None, :, :, None]) / sigma) ** 2) / sigma
        p = (route[..., None] * dens).sum(2).mean(1)                             # (N, K)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)
