"""Ray Tune sweeps through `agescale tune`, on a real local Ray instance; every trial is a real
DeepSpeed training run on shards of the shared UTKFace images (32 px, 16 steps, CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from base.config import resolved
from base.errors import UserError

from conftest import AGESCALE, REPO

pytestmark = pytest.mark.slow

GRID = {("dex", 0.5), ("dex", 1.5), ("l1", 0.5), ("l1", 1.5)}


def write_spec(path: Path, shards, space: dict | None = None, **extra) -> Path:
    spec = {
        "base": str(REPO / "configs" / "experiments" / "demo_cpu.yaml"),
        "overrides": {"data.loader.shards": str(shards), "data.loader.image_size": 32,
                      "data.loader.batch_size": 32, "train.max_steps": 16, "train.val_every_steps": 4,
                      "train.ckpt_every_steps": 100, "train.test_at_end": False, "train.log_every_steps": 4,
                      "train.optimizer.warmup_steps": 2},
        "space": space or {"data.loader.augment.strength": {"grid": [0.5, 1.5]}},
        # max_t = the trials' 4 validation rounds: ASHA stops every trial that gets there at its
        # last report, and the one at round 2 may stop others early.
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2, "max_t": 4},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "max_failures": 1, **extra,
    }
    if space is None and "variants" not in extra:  # the method as a named variant (a bundle of keys)
        spec["variants"] = {"dex": {"model.method": "dex"}, "l1": {"model.method": "l1", "model.gender_head": True}}
    path.write_text(yaml.safe_dump(spec))
    return path


def tune_env(home: Path) -> dict:
    """A private HOME, to see what Ray writes there; the compiled DeepSpeed op stays shared."""
    env = dict(os.environ, HOME=str(home))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    home.mkdir(exist_ok=True)
    return env


def tune(*args, home: Path, timeout=600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([AGESCALE, "tune", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=tune_env(home), timeout=timeout)


def rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def val_maes(run_dir: Path) -> dict[int, float]:
    """Validation MAE by step, from the trainer's own log (not from Ray)."""
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["mae"] for l in lines if l["phase"] == "val"}


@pytest.fixture(scope="module")
def sweep(utk_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec = write_spec(tmp / "spec.yaml", utk_shards)
    r = tune(spec, "--out", "out", home=tmp / "home", cwd=tmp)  # a relative --out, as users write it
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, spec, r


def test_asha_sweep_of_four_real_trials(sweep):
    tmp, _, r = sweep
    out = tmp / "out"
    table = rows(out)
    assert len(table) == 4
    assert {(t["variant"], float(t["data.loader.augment.strength"])) for t in table} == GRID
    assert {t["status"] for t in table} <= {"completed", "stopped"}
    assert any(t["status"] == "completed" for t in table)
    for t in table:
        assert Path(t["run_dir"]).parent == out / "trials"
        own = val_maes(Path(t["run_dir"]))          # what the trainer itself logged
        assert float(t["best_val_mae"]) == pytest.approx(min(own.values()))
        assert int(t["val_rounds"]) == len(own) and int(t["steps"]) == max(own)
        # A trial ASHA ends at its last rung, after all its steps, is completed, with its summary.
        done = (Path(t["run_dir"]) / "summary.json").exists()
        assert (t["status"] == "completed") == (int(t["steps"]) == 16) == done, t
        cfg = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        assert cfg["model"]["method"] == t["variant"]
        assert cfg["data"]["loader"]["augment"]["strength"] == float(t["data.loader.augment.strength"])
    result = json.loads((out / "results.json").read_text())
    best = min(table, key=lambda t: float(t["best_val_mae"]))
    assert result["best_trial"] == best["trial_id"] and len(result["trials"]) == 4
    assert all(len(t["history"]) == int(t["val_rounds"]) for t in result["trials"])
    assert (out / "val_mae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = [l for l in (out / "results.md").read_text().splitlines() if l.startswith("| ") and "---" not in l]
    assert md[0].startswith("| variant | data.loader.augment.strength | seeds | test MAE |")
    assert len(md) == 5 and {tuple(c.strip() for c in l.split("|")[1:3]) for l in md[1:]} == {
        (m, str(a)) for m, a in GRID}
    for line in md[1:]:  # the model's size and speed come from the trial's own files
        cells = [c.strip() for c in line.split("|")[1:-1]]
        done = next(t for t in table if (t["variant"], t["data.loader.augment.strength"]) == tuple(cells[:2]))
        assert float(cells[-1]) == pytest.approx(float(done["images_per_s"]), abs=0.5)
    assert f"best: {best['trial_id']}" in r.stdout
    # Ray 2.60's auth token and Tune's default results folder stay out of the user's home.
    home = tmp / "home"
    assert not (home / ".ray").exists() and not (home / "ray_results").exists()


def test_best_yaml_trains_unchanged_and_reproduces_the_trial(sweep):
    tmp, _, _ = sweep
    out = tmp / "out"
    best = min(rows(out), key=lambda t: float(t["best_val_mae"]))
    env = dict(tune_env(tmp / "home"), OMP_NUM_THREADS="1")  # as the 1-CPU trial ran
    r = subprocess.run([AGESCALE, "train", str(out / "best.yaml")], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = val_maes(out / "best_run")
    trial = val_maes(Path(best["run_dir"]))
    assert sorted(again) == sorted(trial)
    assert again == pytest.approx(trial, abs=1e-3)


def test_a_crashing_trial_is_retried_then_marked_errored(utk_shards, utk_shards_copy, tmp_path):
    broken = utk_shards_copy / "train" / "train-000002.tar"
    broken.write_bytes(broken.read_bytes()[:20000])
    spec = write_spec(tmp_path / "spec.yaml", utk_shards,
                      space={"data.loader.shards": {"grid": [str(utk_shards), str(utk_shards_copy)]}})
    r = tune(spec, "--out", tmp_path / "out", home=tmp_path / "home")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    by_data = {t["data.loader.shards"]: t for t in rows(tmp_path / "out")}
    bad, good = by_data[str(utk_shards_copy)], by_data[str(utk_shards)]
    assert bad["status"] == "errored" and int(bad["attempts"]) == 2      # max_failures: 1 -> one retry
    assert "train-000002.tar" in bad["error"] and bad["best_val_mae"] == ""
    assert good["status"] == "completed" and int(good["attempts"]) == 1 and int(good["steps"]) == 16
    assert json.loads((tmp_path / "out" / "results.json").read_text())["counts"] == \
        {"completed": 1, "stopped": 0, "errored": 1}


def test_killed_driver_resumes_to_the_same_results(sweep, tmp_path):
    _, spec, _ = sweep
    out = tmp_path / "out"
    proc = subprocess.Popen([AGESCALE, "tune", str(spec), "--out", str(out)], cwd=REPO, env=tune_env(tmp_path / "home"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for reported validations, then kill
        if any(len(val_maes(p.parent)) >= 2 for p in out.glob("trials/*/metrics.jsonl")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    import psutil

    ray_procs = [p for p in psutil.Process(proc.pid).children(recursive=True) if "reaper" not in " ".join(p.cmdline())]
    assert any("DashboardAgent" in p.name() + " ".join(p.cmdline()) for p in ray_procs), [p.name() for p in ray_procs]
    proc.send_signal(signal.SIGKILL)                                       # the driver alone, as the OOM killer does
    proc.wait()
    gone = lambda p: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE  # noqa: E731
    deadline = time.time() + 30
    while time.time() < deadline and not all(gone(p) for p in ray_procs):
        time.sleep(0.5)
    assert all(gone(p) for p in ray_procs), [p.name() for p in ray_procs if not gone(p)]  # none outlives it
    assert not (out / "results.csv").exists()

    r = tune("--resume", out, home=tmp_path / "home")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = rows(out)
    assert len(table) == 4 and {t["status"] for t in table} <= {"completed", "stopped"}
    resumed = []
    for t in table:
        starts = [json.loads(l) for l in (Path(t["run_dir"]) / "attempts.jsonl").read_text().splitlines()]
        if len(starts) > 1 and starts[-1]["from_checkpoint"]:
            resumed.append(t)
            steps = list(val_maes(Path(t["run_dir"])))
            assert steps == sorted(steps) and int(t["steps"]) == max(steps)  # continued, not restarted
    assert resumed, "no trial continued from its checkpoint"
    # Trials are deterministic: one that completed in both sweeps ends with the same MAE.
    first = {(t["variant"], t["data.loader.augment.strength"]): t for t in rows(sweep[0] / "out")}
    same = [(t, first[(t["variant"], t["data.loader.augment.strength"])]) for t in table]
    both = [(a, b) for a, b in same if a["status"] == b["status"] == "completed"]
    assert both
    for a, b in both:
        assert float(a["final_val_mae"]) == pytest.approx(float(b["final_val_mae"]), abs=1e-4)


def test_spec_errors_name_the_key(utk_shards, tmp_path):
    spec = write_spec(tmp_path / "a.yaml", utk_shards, space={"model.methd": {"grid": ["dex"]}})
    r = tune(spec, "--out", tmp_path / "o1", home=tmp_path / "home")
    assert r.returncode == 2 and "model.methd" in r.stderr and "did you mean 'model.method'" in r.stderr
    spec = write_spec(tmp_path / "b.yaml", utk_shards, space={"train.optimizer.lr": {"uniform": [0.1, 0.01]}})
    r = tune(spec, "--out", tmp_path / "o2", home=tmp_path / "home")
    assert r.returncode == 2 and "space.train.optimizer.lr.uniform" in r.stderr and "low < high" in r.stderr
    spec = write_spec(tmp_path / "c.yaml", utk_shards, space={"model.method": {"grid": ["dex", "nope"]}})
    r = tune(spec, "--out", tmp_path / "o3", home=tmp_path / "home")
    assert r.returncode == 2 and "space.model.method value 'nope'" in r.stderr
    spec = write_spec(tmp_path / "d.yaml", utk_shards, space={"model.method": {"grid": ["dex", "l1"]}},
                      scheduler={"name": "pbt"})
    r = tune(spec, "--out", tmp_path / "o4", home=tmp_path / "home")
    assert r.returncode == 2 and "model.method cannot change" in r.stderr
    r = tune("--resume", tmp_path / "nothing", home=tmp_path / "home")
    assert r.returncode == 2 and "no sweep.json" in r.stderr
    r = tune(write_spec(tmp_path / "e.yaml", utk_shards), "--out", tmp_path / "o5", "--only", "dex,nope",
             home=tmp_path / "home")
    assert r.returncode == 2 and "has no variant 'nope' (it has: dex, l1)" in r.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5"))


def test_the_methods_spec_covers_every_method_and_family_and_variants_are_checked_whole(tmp_path):
    from search.spec import load_spec, trial_config
    from trainer.methods import list_methods

    spec, base = load_spec(REPO / "configs" / "tune" / "methods.yaml")
    bundles = spec.variants.values()
    assert {b.get("model.method") for b in bundles} >= {m.name for m in list_methods()}
    assert {b.get("model.architecture", "timm") for b in bundles} == {"timm", "mivolo", "swinface"}
    assert any(b.get("model.gender_conditioned_age") for b in bundles) and any(b.get("model.attention") for b in bundles)
    cfg = trial_config(resolved(base), {"variant": "swinface"}, tmp_path / "run", spec.variants)
    assert (cfg.model.architecture, cfg.model.method, cfg.model.model_args["patch_size"]) == (
        "swinface", "gaussian_blend", 2)
    assert cfg.train.max_steps == 600 and cfg.train.optimizer.warmup_steps == 100
    assert cfg.train.run_dir == str(tmp_path / "run")
    # --only: one row of the table again (a stopped trial, a new seed), the rest of the grid left out
    from search.sweep import only_variants
    assert list(only_variants(spec, ["swinface", "ldl"], Path("m.yaml")).variants) == ["ldl", "swinface"]
    assert len(spec.variants) > 2                                       # the spec itself is not cut
    bad = write_spec(tmp_path / "bad.yaml", tmp_path, variants={"vit": {"model.architecture": "mivolo"}})
    with pytest.raises(UserError, match="variants.vit: .*needs a volo_\\* backbone"):
        load_spec(bad)


def test_trial_on_two_ray_train_workers(utk_shards, tmp_path):
    """resources.workers: 2 -> the trial builds a Ray Train TorchTrainer; both ranks train in sync."""
    spec = write_spec(tmp_path / "spec.yaml", utk_shards, space={"model.method": {"grid": ["dex"]}},
                      resources={"workers": 2, "cpus_per_worker": 1})
    r = tune(spec, "--out", tmp_path / "out", home=tmp_path / "home")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = rows(tmp_path / "out")
    assert row["status"] == "completed" and int(row["steps"]) == 16
    summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["param_checksums"][0] == summary["param_checksums"][1]
    assert float(row["best_val_mae"]) == pytest.approx(min(val_maes(Path(row["run_dir"])).values()))


def test_pbt_copies_a_better_trial_and_perturbs_its_config(utk_shards, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", utk_shards,
                      space={"train.optimizer.lr": {"grid": [0.0001, 0.005]},
                             "data.loader.augment.strength": {"uniform": [0.5, 1.5]}},
                      scheduler={"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
                                 "synch": True})
    spec_raw = yaml.safe_load(spec.read_text())
    spec_raw["overrides"]["train.max_steps"] = 20  # 5 rounds: perturbations after rounds 2 and 4
    spec.write_text(yaml.safe_dump(spec_raw))
    r = tune(spec, "--out", tmp_path / "out", home=tmp_path / "home")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = {t["trial_id"]: t for t in rows(tmp_path / "out")}
    assert len(table) == 2 and all(t["status"] == "completed" for t in table.values())
    exploits = [json.loads(l) for l in (tmp_path / "out" / "ray" / "pbt_global.txt").read_text().splitlines()]
    assert exploits, "PBT never exploited"
    target_tag, _, _, _, _, new_config = exploits[-1]
    target = next(t for tid, t in table.items() if tid.endswith(f"_{int(target_tag.split('_')[0]):05d}"))
    starts = [json.loads(l) for l in (Path(target["run_dir"]) / "attempts.jsonl").read_text().splitlines()]
    assert any(s["from_checkpoint"] for s in starts[1:])        # continued from the copied checkpoint
    cfg = yaml.safe_load((Path(target["run_dir"]) / "config.yaml").read_text())
    assert cfg["train"]["optimizer"]["lr"] == pytest.approx(new_config["train.optimizer.lr"])
    assert cfg["data"]["loader"]["augment"]["strength"] == \
        pytest.approx(new_config["data.loader.augment.strength"])
