"""`agescale tune`: start (or resume) a Ray Tune sweep and write its tables.

Layout of OUT:
  sweep.json        the spec and the resolved base config (what --resume reads)
  ray/              Ray Tune's experiment state, per-trial results and Tune checkpoints
  trials/<id>/      each trial's run directory (config.yaml, metrics.jsonl, checkpoints, ...)
  results.csv, results.json, best.yaml, val_mae.png   written at the end (results.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from base.config import resolved
from base.errors import UserError
from search.spec import SweepSpec, load_spec

EXPERIMENT = "ray"
STATE = "sweep.json"


def _start_ray(spec: SweepSpec) -> None:
    from cluster.ray_session import start_ray

    start_ray(spec.ray.address, spec.ray.num_cpus)


def _sampler(kind: str, args):
    from ray import tune

    return {"grid": tune.grid_search, "choice": tune.choice}[kind](args) if kind in ("grid", "choice") else \
        getattr(tune, kind)(*args)


def _trainable(spec: SweepSpec, base: dict, out: Path):
    from ray import tune

    from search.trial import run_trial

    r = spec.resources
    every = spec.scheduler.perturbation_interval if spec.scheduler.name == "pbt" else 1
    fn = tune.with_parameters(run_trial, base=base, out=str(out), workers=r.workers,
                              cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                              checkpoint_every=every, variants=spec.variants)
    if r.workers == 1:
        return tune.with_resources(fn, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker})
    # The trial is only a driver; its Ray Train workers ask for their own resources. Tune needs a
    # non-empty request, and a CPU held by an idle driver could leave its workers unschedulable.
    return tune.with_resources(fn, {"cpu": 0, "memory": 1})


def _max_concurrent(spec: SweepSpec) -> int | None:
    """Trials at once: as the spec says, else for Ray Train trials as many as the cluster's CPUs
    hold (their drivers reserve nothing, so Tune alone would start them all)."""
    import ray

    r = spec.resources
    if spec.max_concurrent or r.workers == 1:
        return spec.max_concurrent
    per_trial = r.workers * r.cpus_per_worker
    return max(1, int(ray.cluster_resources().get("CPU", per_trial) // per_trial))


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="val_round", max_t=s.max_t, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        return PopulationBasedTraining(time_attr="val_round", perturbation_interval=s.perturbation_interval,
                                       quantile_fraction=s.quantile_fraction, synch=s.synch,
                                       hyperparam_mutations={k: _sampler(*next(iter(v.items())))
                                                             if next(iter(v)) != "grid" else next(iter(v.values()))
                                                             for k, v in spec.space.items()})
    return FIFOScheduler()


def _run_config(spec: SweepSpec, out: Path):
    from ray import tune

    return tune.RunConfig(
        name=EXPERIMENT, storage_path=str(out), verbose=1, log_to_file=True,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # PBT copies checkpoints between trials some rounds after they were reported: keep a few.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if spec.scheduler.name == "pbt" else 1))


def only_variants(spec: SweepSpec, names: list[str], spec_path: Path) -> SweepSpec:
    """The spec cut down to the named variants: re-running one row of a table (a trial that was
    stopped, a new seed) without the rest of the grid."""
    unknown = [n for n in names if n not in spec.variants]
    if not spec.variants:
        raise UserError(f"--only: {spec_path} has no variants to choose from")
    if unknown:
        raise UserError(f"--only: {spec_path} has no variant {unknown[0]!r} (it has: {', '.join(spec.variants)})")
    return spec.model_copy(update={"variants": {n: spec.variants[n] for n in spec.variants if n in names}})


def run_sweep(spec_path: Path, out: Path, overrides: list[str] = (), only: list[str] | None = None) -> dict:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    spec, base = load_spec(spec_path, overrides)
    if only:
        spec = only_variants(spec, only, spec_path)
    out = out.resolve()  # trials run in Ray workers with another working directory
    if (out / STATE).exists():
        raise UserError(f"{out} already holds a sweep: continue it with `agescale tune --resume {out}` "
                        f"or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    base_raw = resolved(base)
    (out / STATE).write_text(json.dumps({"spec": spec.model_dump(mode="json"), "base": base_raw,
                                         "spec_file": str(spec_path)}, indent=1) + "\n")
    _start_ray(spec)
    space = {k: _sampler(*next(iter(v.items()))) for k, v in spec.space.items()}
    if spec.variants:
        space["variant"] = tune.grid_search(list(spec.variants))
    tuner = tune.Tuner(
        _trainable(spec, base_raw, out), param_space=space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=_scheduler(spec), max_concurrent_trials=_max_concurrent(spec),
                                    search_alg=BasicVariantGenerator(random_state=spec.seed)),
        run_config=_run_config(spec, out))
    return _finish(tuner.fit(), spec, base_raw, out)


def resume_sweep(out: Path) -> dict:
    from ray import tune

    out = out.resolve()
    state_file = out / STATE
    if not state_file.exists():
        raise UserError(f"{out}: no {STATE} there; is it the --out folder of an `agescale tune` sweep?")
    state = json.loads(state_file.read_text())
    spec = SweepSpec.model_validate(state["spec"])
    if not tune.Tuner.can_restore(str(out / EXPERIMENT)):
        raise UserError(f"{out / EXPERIMENT}: no Ray Tune experiment state to resume (the sweep stopped before "
                        f"its first trial started); start it again with another --out")
    _start_ray(spec)
    tuner = tune.Tuner.restore(str(out / EXPERIMENT), trainable=_trainable(spec, state["base"], out),
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    return _finish(tuner.fit(), spec, state["base"], out)


def _finish(grid, spec: SweepSpec, base: dict, out: Path) -> dict:
    from search.results import write_results

    return write_results(grid, spec, base, out)
