"""Calibrated 90 % age interval: split conformal prediction, fitted on the validation split.

The central interval of a trained distribution is over-confident after long training (its
coverage falls to ~0.70), and regression methods have no distribution at all. Normalised
split conformal (Lei et al. 2018) fixes both with one number: on held-out faces the score is
s = |age - prediction| / max(std, std_floor), std being the predicted distribution's standard
deviation (1 for methods without one, which gives a constant width); q is the
ceil((n + 1) * level) / n empirical quantile of s; the interval is prediction ± q * max(std,
std_floor), clipped to the age range. Coverage on exchangeable new faces is then >= level,
and within 1/(n + 1) of it. Written out (a few lines) because no installed library does
normalised split conformal over torch or NumPy arrays.

The rule is stored in `run/calibration.json` and the bundle's `labels.json`; evaluate, export
and predict apply it (predict in NumPy, without this module).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from base.errors import UserError

CALIBRATION = "calibration.json"
STD_FLOOR = 1.0  # years: keeps a near one-hot distribution from giving a zero-width interval
RULE = ("prediction ± q * max(std, std_floor), clipped to [min_age, max_age]; std = the standard deviation of "
        "`distribution` (1 for methods without one); split conformal on the validation split")


def spread(distribution: torch.Tensor | None, ages: torch.Tensor, n: int) -> torch.Tensor:
    """Per face, the scale the interval grows with: the distribution's std, floored (or ones)."""
    if distribution is None:
        return torch.full((n,), max(1.0, STD_FLOOR), dtype=torch.float64)
    p, a = distribution.double(), ages.double().to(distribution.device)
    mean = p @ a
    std = ((p * (a[None] - mean[:, None]) ** 2).sum(1)).clamp_min(0).sqrt()
    return std.clamp_min(STD_FLOOR).cpu()


def fit(pred: torch.Tensor, age: torch.Tensor, scale: torch.Tensor, level: float = 0.9) -> dict:
    """The conformal quantile q of |age - pred| / scale at `level` (finite-sample corrected)."""
    scores = ((age.double() - pred.double()).abs() / scale.double()).sort().values
    n = len(scores)
    k = math.ceil((n + 1) * level)
    if k > n:
        need = next(m for m in range(1, 10 ** 7) if math.ceil((m + 1) * level) <= m)
        raise UserError(f"interval calibration needs at least {need} validation faces "
                        f"for a {level:.0%} interval, got {n}; use a larger val split or train.calibrate=false")
    return {"method": "split_conformal", "level": level, "q": float(scores[k - 1]), "std_floor": STD_FLOOR,
            "n": n, "rule": RULE}


def bounds(pred: torch.Tensor, scale: torch.Tensor, cal: dict, min_age: float, max_age: float):
    half = cal["q"] * scale.double()
    return (pred.double() - half).clamp(min_age, max_age), (pred.double() + half).clamp(min_age, max_age)


def interval(pred: torch.Tensor, distribution: torch.Tensor | None, ages: torch.Tensor, rule: dict | None,
             level: float = 0.9):
    """(lo, hi) per face in float64 on the CPU: the calibrated rule when given, else the
    distribution's central `level` interval, else None (no distribution, no rule)."""
    if rule is not None:
        scale = spread(distribution, ages, len(pred))
        return bounds(pred.cpu(), scale, rule, float(ages[0]), float(ages[-1]))
    if distribution is None:
        return None
    cdf, grid = distribution.double().cpu().cumsum(1), ages.double().cpu()
    tail = (1 - level) / 2
    last = len(grid) - 1
    return grid[(cdf < tail).sum(1).clamp(max=last)], grid[(cdf < 1 - tail).sum(1).clamp(max=last)]


def save(cal: dict, run_dir: Path) -> None:
    (run_dir / CALIBRATION).write_text(json.dumps(cal, indent=1) + "\n")


def applies(rule: dict | None, weights: Path, run_dir: Path, tta: str, decode: str = "mean") -> dict | None:
    """The stored rule if it was fitted for these weights (the run's best model, which the
    trainer calibrates), this TTA and this decode (the interval is centred on the reported age);
    None otherwise (a checkpoint's raw weights, another TTA or decode)."""
    if rule is None or rule.get("tta", "none") != tta or rule.get("decode", "mean") != decode:
        return None
    return rule if Path(weights).resolve() == (run_dir / "best" / "model.safetensors").resolve() else None


def load(run_dir: Path) -> dict | None:
    path = run_dir / CALIBRATION
    if not path.exists():
        return None
    try:
        cal = json.loads(path.read_text())
        float(cal["q"]), float(cal["level"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a calibration file ({type(e).__name__}: {e})") from None
    return cal
