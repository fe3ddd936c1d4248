"""Methods that shape the predicted age distribution.

- mean_variance (Pan et al. 2018): softmax loss + l1 * (mean - y)^2 / 2 + l2 * variance.
- mean_residue (adaptive, Zhao et al.): softmax loss + l1 * mean loss + l2 * the entropy of
  the probability mass outside a dynamic top-K, K being per sample the fewest ages whose
  probabilities add up to `mass` (0.9), at least `min_k`.
- ldl: label-distribution learning: KL divergence to a Gaussian around the true age
  (sigma 2 years; `sigma_per_year` > 0 widens it with the age); `lambda_l1` > 0 adds DLDL-v2's term (Gao et al., IJCAI 2018): the L1
  distance between the distribution's expectation (the predicted age) and the true age, so the
  loss also optimises the number the metric measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.methods import AgeMethod, register_method


def mean_and_variance(p: torch.Tensor, ages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = p @ ages
    var = (p * (ages[None] - mean[:, None]) ** 2).sum(1)
    return mean, var


@register_method
class MeanVariance(AgeMethod):
    name, summary = "mean_variance", "softmax + mean loss + variance loss (Pan et al. 2018)"
    lambda_mean, lambda_var = 0.2, 0.05
    _limits = {"lambda_mean": (0.0, 100.0), "lambda_var": (0.0, 100.0)}

    def loss(self, out, age):
        logits = out.float()
        mean, var = mean_and_variance(torch.softmax(logits, 1), self.ages.to(logits))
        parts = {"softmax": F.cross_entropy(logits, self.age_index(age)),
                 "mean": 0.5 * ((mean - age.float()) ** 2).mean(), "variance": var.mean()}
        parts["loss"] = parts["softmax"] + self.lambda_mean * parts["mean"] + self.lambda_var * parts["variance"]
        return parts


@register_method
class MeanResidue(AgeMethod):
    name, summary = "mean_residue", "softmax + mean loss + entropy outside a dynamic top-K (adaptive)"
    lambda_mean, lambda_residue, mass, min_k = 0.2, 0.1, 0.9, 2
    _limits = {"lambda_mean": (0.0, 100.0), "lambda_residue": (0.0, 100.0), "mass": (0.01, 1.0), "min_k": (1, 50)}

    def residue(self, p: torch.Tensor) -> torch.Tensor:
        sorted_p, _ = p.sort(dim=1, descending=True)
        before = sorted_p.cumsum(1) - sorted_p           # mass of the higher-ranked ages
        keep = (before < self.mass) | (torch.arange(p.shape[1], device=p.device)[None] < self.min_k)
        tail = sorted_p * (~keep)
        return -(tail * torch.log(tail.clamp_min(1e-12))).sum(1)

    def loss(self, out, age):
        logits = out.float()
        p = torch.softmax(logits, 1)
        mean, _ = mean_and_variance(p, self.ages.to(logits))
        parts = {"softmax": F.cross_entropy(logits, self.age_index(age)),
                 "mean": 0.5 * ((mean - age.float()) ** 2).mean(), "residue": self.residue(p).mean()}
        parts["loss"] = parts["softmax"] + self.lambda_mean * parts["mean"] + self.lambda_residue * parts["residue"]
        return parts


@register_method
class LabelDistribution(AgeMethod):
    name, summary = "ldl", "label-distribution learning: KL to a Gaussian around the age"
    sigma = 2.0
    # > 0: the width grows with the age, sigma + sigma_per_year * age, since the labels' own
    # uncertainty does (a face of 60 is not dated to two years as one of 6 is); ALDL (Geng et al.,
    # AAAI 2014) learns a width per age, this is its one-parameter form
    sigma_per_year = 0.0
    lambda_l1 = 0.0
    # sigma in years; below ~0.1 the target is one-hot and the KL degenerates
    _limits = {"sigma": (0.1, 50.0), "sigma_per_year": (0.0, 1.0), "lambda_l1": (0.0, 100.0)}

    def target(self, age: torch.Tensor) -> torch.Tensor:
        age = age.float()
        d = self.ages.to(age.device)[None] - age[:, None]
        width = self.sigma + self.sigma_per_year * age.clamp_min(0)[:, None]
        t = torch.exp(-0.5 * (d / width) ** 2)
        return t / t.sum(1, keepdim=True)

    def loss(self, out, age):
        log_p = torch.log_softmax(out.float(), 1)
        parts = {"kl": F.kl_div(log_p, self.target(age), reduction="batchmean")}
        if self.lambda_l1 == 0:
            return {"loss": parts["kl"]}
        parts["l1"] = (log_p.exp() @ self.ages.to(log_p) - age.float()).abs().mean()
        parts["loss"] = parts["kl"] + self.lambda_l1 * parts["l1"]
        return parts
