"""Age methods: each one file, registered by name with its head, loss, decoding rule and (where
it has one) its age distribution. Adding a method is one new module plus its import below.

A method sees the head's raw outputs (N, out_features) and ages in years (N,). `loss` returns
its parts (timm-style) with the total under "loss"; `predict` turns outputs into ages;
`distribution` gives (N, K) probabilities over the integer ages min_age..max_age, or None.
`estimate` is what evaluation, export and serving report: `predict`, or with decode "median"
the median of `distribution` (the number that minimises the expected absolute error).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from base.errors import UserError


class AgeMethod:
    """Base: a plain linear head; subclasses define the rest."""

    name = ""
    summary = ""
    # The range each numeric option accepts (inclusive); a value outside is refused at load time.
    _limits: dict[str, tuple[float, float]] = {}

    # False for methods whose output is one number (regression): no distribution to take a median of
    has_distribution = True

    def __init__(self, min_age: int = 0, max_age: int = 100, decode: str = "mean", **options: float):
        if not 0 <= min_age < max_age:
            raise UserError(f"age range [{min_age}, {max_age}] is empty")
        self.use_decode(decode)
        # `model.method_args`: each key overrides one of the method's numeric class attributes
        # (LDL's sigma, DEX's label_smoothing, mean-variance's lambdas, ...).
        for key, value in options.items():
            default = getattr(type(self), key, None)
            if key.startswith("_") or not isinstance(default, (int, float)) or isinstance(default, bool):
                known = [k for k in dir(type(self)) if not k.startswith("_")
                         and isinstance(getattr(type(self), k), (int, float)) and not isinstance(getattr(type(self), k), bool)]
                raise UserError(f"model.method_args.{key}: not an option of method {self.name!r} "
                                f"(its options: {', '.join(known) or 'none'})")
            if isinstance(default, int) and float(value) != int(value):
                raise UserError(f"model.method_args.{key}={value}: method {self.name!r} needs a whole number")
            lo, hi = self._limits.get(key, (float("-inf"), float("inf")))
            if not lo <= float(value) <= hi:  # also refuses nan
                raise UserError(f"model.method_args.{key}={value}: method {self.name!r} takes {lo} to {hi}")
            setattr(self, key, type(default)(value))
        self.min_age, self.max_age = min_age, max_age
        self.progress = 0.0  # fraction of training done; the trainer sets it (see `set_progress`)
        self.num_ages = max_age - min_age + 1
        self.ages = torch.arange(min_age, max_age + 1, dtype=torch.float32)

    @property
    def out_features(self) -> int:
        return self.num_ages

    def set_progress(self, fraction: float) -> None:
        """Called by the trainer before each step, from the step count (so a resumed run sets the
        same value): for losses that change over training, like SwinFace's blend."""
        self.progress = float(fraction)

    def head(self, in_features: int) -> nn.Module:
        return nn.Linear(in_features, self.out_features)

    def loss(self, out: torch.Tensor, age: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        p = self.distribution(out)
        return p @ self.ages.to(p)

    def distribution(self, out: torch.Tensor) -> torch.Tensor | None:
        return torch.softmax(out.float(), dim=1)

    def use_decode(self, decode: str, key: str = "model.decode") -> None:
        """Set how `estimate` reads the outputs; `key` names the setting in the error."""
        if decode not in DECODES:
            raise UserError(f"{key}={decode!r}: one of {', '.join(DECODES)}")
        if decode == "median" and not self.has_distribution:
            raise UserError(f"{key}=median: method {self.name!r} predicts one number, with no age "
                            f"distribution to take the median of; use {key}=mean")
        self.decode = decode

    def estimate(self, out: torch.Tensor) -> torch.Tensor:
        """The reported age: the method's own `predict` (for distributions, their mean), or the
        distribution's median with `decode: median`."""
        if self.decode == "median":
            return distribution_median(self.distribution(out), self.min_age)
        return self.predict(out)

    def age_index(self, age: torch.Tensor) -> torch.Tensor:
        return (age.round().clamp(self.min_age, self.max_age) - self.min_age).long()


DECODES = ("mean", "median")


def distribution_median(p: torch.Tensor, min_age: int) -> torch.Tensor:
    """Median of (N, K) probabilities over the integer ages min_age.., each age's mass spread
    evenly over [age - 0.5, age + 0.5] (so the median moves smoothly with the probabilities).
    The mean minimises the expected squared error; the median minimises the expected absolute
    error, which MAE measures. Written out because torch's `quantile` takes samples, not a
    distribution; it exports to ONNX (cumsum, compare, gather)."""
    p = p.float()
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)  # CORAL's clipped differences may not sum to 1
    cdf = p.cumsum(1)
    k = (cdf < 0.5).sum(1, keepdim=True).clamp(max=p.shape[1] - 1)   # first age whose cdf reaches 0.5
    below = (cdf - p).gather(1, k)                                     # mass of the ages under it
    mass = p.gather(1, k).clamp_min(1e-12)
    return (min_age - 0.5 + k + ((0.5 - below) / mass).clamp(0, 1)).squeeze(1)


_REGISTRY: dict[str, Callable[..., AgeMethod]] = {}


def register_method(cls: type[AgeMethod]) -> type[AgeMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"age method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[type[AgeMethod]]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def create_method(name: str, **kwargs) -> AgeMethod:
    if name not in _REGISTRY:
        raise UserError(f"unknown age method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


from trainer.methods import classification, coral, distribution, forest, regression  # noqa: E402,F401
