"""Mixup for every age method: the images of a batch are blended with a shuffled copy, and the
loss is the same blend of the two label sets' losses (Zhang et al. 2018).

Written here rather than taken from timm: `timm.data.Mixup` mixes one-hot class targets, which
fits DEX but not the regression, ordinal and distribution losses; blending the losses works for
all of them (and for the gender and race heads) without each method knowing about it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mixup_pairs(n: int, alpha: float, prob: float) -> tuple[float, torch.Tensor] | None:
    """(lam, perm) for this batch, or None when it is not mixed. Draws from torch's global RNG,
    which the trainer seeds per step, so a resumed run mixes the same pairs."""
    if alpha <= 0 or n < 2 or float(torch.rand(())) >= prob:
        return None
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return max(lam, 1.0 - lam), torch.randperm(n)  # the first image dominates, as in timm


def mix_images(images: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    return images.mul(lam).add_(images[perm], alpha=1.0 - lam)


def mixed_loss(loss_fn: Callable[[dict], dict[str, torch.Tensor]], labels: dict[str, torch.Tensor],
               lam: float, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """lam * loss(labels) + (1 - lam) * loss(labels[perm]), part by part. A sample counts only
    when both of its images are real (not loader padding)."""
    valid = labels["valid"] & labels["valid"][perm]
    a = loss_fn({**labels, "valid": valid})
    b = loss_fn({**{k: v[perm] for k, v in labels.items()}, "valid": valid})
    return {k: lam * a[k] + (1.0 - lam) * b[k] for k in a}
