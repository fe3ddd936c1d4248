"""The sweep spec (`agescale tune SPEC.yaml`): a base training config, a search space over dotted
config keys, a scheduler, resources per trial and the metric. Validated before Ray starts, so a
typo in a key or a value outside the trainer's range fails in a second, naming the key.

    base: ../experiments/demo_cpu.yaml     # a run config (path relative to this file)
    overrides: {train.epochs: 4}           # dotted overrides applied to the base first
    space:                                 # dotted key -> one sampler
      model.method: {grid: [dex, l1]}
      data.augment.strength: {uniform: [0.5, 1.5]}
      train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}
    num_samples: 1                         # times the grid is repeated (random keys drawn anew)
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}

A grid over *bundles* of keys (a model family changes its architecture, backbone and method at
once) is `variants`: named sets of dotted overrides, one trial per name, crossed with `space`
(which may then be empty); the trial's `variant` column names it.

    variants:
      ldl: {model.method: ldl}
      mivolo: {model.architecture: mivolo, model.backbone: volo_d1_224, model.method: l2_range}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from base.config import Strict, apply_override, explain, parse_override, resolved
from base.errors import UserError
from trainer.run_config import Config, load_config

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform")
# Keys PBT may change while a run continues from a checkpoint (they keep the model's shape).
PBT_MUTABLE = ("train.optimizer.lr", "data.loader.augment.", "model.age_weight", "model.gender_weight",
               "model.race_weight")


class Resources(Strict):
    workers: int = Field(1, ge=1, description="1: the trainer runs inside the trial; >1: a Ray Train TorchTrainer")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)


class Scheduler(Strict):
    name: Literal["asha", "pbt", "fifo"] = "asha"
    # ASHA (time is counted in validation rounds, `val_round`: one per epoch unless
    # train.val_every_steps is set).
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    max_t: int = Field(100, ge=1, description="ASHA's largest rung, in validation rounds")
    # PBT: every `perturbation_interval` rounds the worst quantile copies a better trial's
    # checkpoint and perturbs the space's keys.
    perturbation_interval: int = Field(2, ge=1)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    synch: bool = Field(False, description="PBT waits for every trial at each perturbation (reproducible, "
                                           "slower when trials run at different speeds)")


class RayOptions(Strict):
    address: str | None = Field(None, description="an existing cluster ('auto' or host:port); default: local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all)")


class SweepSpec(Strict):
    base: str | dict = Field(..., description="a run config file (relative to the spec) or an inline mapping")
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named bundles of dotted "
                                                "overrides: one trial per name, crossed with space")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    num_samples: int = Field(1, ge=1)
    metric: Literal["val_mae"] = "val_mae"
    mode: Literal["min"] = "min"
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1, description="trials at once (default: as resources allow)")
    max_failures: int = Field(1, ge=0, description="retries of a crashed trial before it is marked errored")
    seed: int = Field(0, ge=0, description="seed of the random search (the trials' own seed is train.seed)")
    ray: RayOptions = Field(default_factory=RayOptions)

    @model_validator(mode="after")
    def _samplers(self) -> "SweepSpec":
        if not self.space and not self.variants:
            raise ValueError("space: give at least one key to search (or variants)")
        if "variant" in self.space:
            raise ValueError("space.variant: the name is reserved for `variants`")
        for name, bundle in self.variants.items():
            if not isinstance(bundle, dict) or not bundle:
                raise ValueError(f"variants.{name}: a mapping of dotted keys to values is needed, got {bundle!r}")
        for key, sampler in self.space.items():
            if len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
                raise ValueError(f"space.{key}: give exactly one sampler of {', '.join(SAMPLERS)}, "
                                 f"e.g. {{grid: [a, b]}}; got {sampler!r}")
            kind, args = next(iter(sampler.items()))
            if kind in ("grid", "choice"):
                if not isinstance(args, list) or not args:
                    raise ValueError(f"space.{key}.{kind}: a non-empty list of values is needed, got {args!r}")
            elif not (isinstance(args, list) and len(args) == (3 if kind == "quniform" else 2)
                      and all(isinstance(a, (int, float)) for a in args) and args[0] < args[1]):
                raise ValueError(f"space.{key}.{kind}: expected [low, high{', q' if kind == 'quniform' else ''}] "
                                 f"with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"space.{key}.loguniform: low must be > 0, got {args[0]}")
        if self.scheduler.name == "pbt":
            bad = [k for k in [*self.space, *(k for b in self.variants.values() for k in b)]
                   if not k.startswith(PBT_MUTABLE)]
            if bad:
                raise ValueError(f"scheduler pbt changes keys while a run continues from a checkpoint; "
                                 f"{', '.join(bad)} cannot change then (allowed: {', '.join(PBT_MUTABLE)}...)")
            if self.resources.workers > 1:
                raise ValueError("scheduler pbt needs resources.workers: 1 (a trial run by Ray Train reports "
                                 "checkpoint paths, not Tune checkpoints that PBT can copy between trials)")
        return self

    def values_to_check(self) -> list[dict[str, Any]]:
        """Assignments that cover every listed value and each range's ends, checked against the
        trainer's schema before any trial starts."""
        out = []
        for key, sampler in self.space.items():
            kind, args = next(iter(sampler.items()))
            values = args if kind in ("grid", "choice") else args[:2]
            out += [{key: v} for v in values]
        return out


def load_spec(path: Path, extra_overrides: list[str] = ()) -> tuple[SweepSpec, Config]:
    """The validated spec and its base config (overrides applied), or a UserError naming the key."""
    if not path.is_file():
        raise UserError(f"sweep spec {path}: not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping (base, space, scheduler, ...)")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(_explain_spec(e, path)) from None
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        if not base_path.is_file():
            raise UserError(f"{path}: base config {spec.base!r} not found (looked at {base_path})")
        raw_base = resolved(load_config(base_path))
    else:
        raw_base = dict(spec.base)
    base = _absolute_paths(_config_from(raw_base, list(extra_overrides), f"{path}: base", spec.overrides))
    for assignment in spec.values_to_check():
        key, value = next(iter(assignment.items()))
        _config_from(resolved(base), [], f"{path}: space.{key} value {value!r}", {key: value})
    for name, bundle in spec.variants.items():  # checked as a whole: a family's keys only fit together
        _config_from(resolved(base), [], f"{path}: variants.{name}", bundle)
    return spec, base


def _explain_spec(err: ValidationError, path: Path) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown sweep key {key!r}")
        else:
            lines.append(f"{path}: {key}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def _config_from(raw: dict, overrides: list[str], where: str, params: dict | None = None) -> Config:
    """`raw` with `params` (dotted key -> value) and then `overrides` (KEY=VALUE text) applied."""
    for key, value in (params or {}).items():
        apply_override(raw, key.split("."), value, f"{key}={value}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{where}: " + explain(e, lambda k: "config", Config)) from None


def _absolute_paths(cfg: Config) -> Config:
    """Trials run in Ray workers whose working directory is not the user's: paths in the config
    are taken relative to where `agescale tune` was started, as `agescale train` would."""
    cfg.data.loader.shards = str(Path(cfg.data.loader.shards).resolve())
    if cfg.model.weights not in ("scratch", "hub"):
        cfg.model.weights = str(Path(cfg.model.weights).resolve())
    if cfg.train.deepspeed_config:
        cfg.train.deepspeed_config = str(Path(cfg.train.deepspeed_config).resolve())
    return cfg


def trial_config(base: dict, params: dict[str, Any], run_dir: Path,
                 variants: dict[str, dict[str, Any]] | None = None) -> Config:
    """The base config with one trial's variant, its sampled values and its own run directory."""
    params = dict(params)
    bundle = (variants or {})[params.pop("variant")] if "variant" in params else {}
    return _config_from(copy.deepcopy(base), [], "trial config",
                        {**bundle, **params, "train.run_dir": str(run_dir)})
