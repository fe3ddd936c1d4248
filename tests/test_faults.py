"""Bad inputs that used to pass silently or end in a traceback: each gets a one-line error
naming the key or flag, before any compute, and exits non-zero."""

from __future__ import annotations

import pytest

from conftest import REPO, SAMPLE, run_cli

CONFIG = REPO / "configs" / "experiments" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def base_run(utk_shards, tmp_path_factory):
    """One finished 12-step run (checkpoints of step 8 and 12 kept), trained once; each test
    damages its own copy (see `copy_of`)."""
    from test_train import small

    run = tmp_path_factory.mktemp("faults") / "base"
    run_cli("train", CONFIG, *small(utk_shards, run), check=True)
    return run


def copy_of(base_run, dst):
    import shutil

    shutil.copytree(base_run, dst)
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.parametrize("override", ["train.optimizer.lr=inf", "train.optimizer.weight_decay=.inf",
                                      "train.optimizer.lr=nan", "data.loader.augment.rotation=nan"])
def test_non_finite_config_numbers_are_refused_at_load_time(override, tmp_path):
    r = run_cli("train", CONFIG, f"train.run_dir={tmp_path / 'run'}", override)
    assert r.returncode == 2
    key = override.split("=")[0]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "finite number" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()                                  # nothing was started


@pytest.mark.parametrize("value", ["-1", "0", "two"])
def test_predict_batch_size_must_be_positive(value, tmp_path):
    r = run_cli("predict", tmp_path, SAMPLE, "--batch-size", value)
    assert r.returncode == 2 and "--batch-size" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_a_diverging_run_stops_with_an_error_and_keeps_its_checkpoint(utk_shards, base_run, tmp_path):
    from test_train import small

    run = copy_of(base_run, tmp_path / "run")
    before = (run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt").read_bytes()
    # A loss weight that makes every loss overflow to inf: the resumed run must not apply it.
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 20, "model.age_weight": 1e38,
                                                            "train.max_nonfinite_steps": 3}), "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    msg = [l for l in r.stderr.splitlines() if l.startswith("agescale: error:")]
    assert len(msg) == 1 and "training diverged" in msg[0] and "3 consecutive batches after step 12" in msg[0]
    assert "step00000012" in msg[0]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step00000012"
    assert (run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt").read_bytes() == before
    assert not (run / "summary.json").exists()


def test_an_existing_run_is_never_trained_over_without_resume_or_overwrite(utk_shards, base_run, tmp_path):
    from test_train import small

    run = copy_of(base_run, tmp_path / "run")
    args = small(utk_shards, run, **{"train.max_steps": 4})
    (run / "notes.txt").write_text("mine")                                 # not a run file: always kept
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli("train", CONFIG, *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already holds a run" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    assert run_cli("train", CONFIG, *args, "--resume", "--overwrite").returncode == 2
    run_cli("train", CONFIG, *args, "--overwrite", check=True)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"phase": "val"' in l for l in lines) == 1                  # one run's rows, not two
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_takes_the_newest_intact_checkpoint_and_says_why(utk_shards, base_run, tmp_path):
    """A damaged LATEST; a truncated newest checkpoint is in the next test."""
    import json

    from test_train import small

    cases = {
        "garbage_latest": (lambda r: (r / "checkpoints" / "LATEST").write_bytes(b"\x00garbage\xff"),
                           "step00000012", "LATEST"),
        "dangling_latest": (lambda r: (r / "checkpoints" / "LATEST").write_text("step00000004\n"),
                            "step00000012", "step00000004"),
    }
    for name, (damage, expect, named) in cases.items():
        run = copy_of(base_run, tmp_path / name)
        damage(run)
        r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 16}), "--resume")
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert named in r.stderr and "starting from scratch" not in r.stdout, (name, r.stderr[-2000:])
        starts = json.loads((run / "run.json").read_text())["starts"]
        assert starts[-1]["resumed_from"] == expect, name
        assert json.loads((run / "summary.json").read_text())["steps"] == 16


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_deletes_only_its_own_checkpoints_and_metrics_read_as_one_run(utk_shards, base_run, tmp_path):
    import json
    import shutil

    from test_train import small

    run = tmp_path / "run"
    shutil.copytree(base_run, run)                                           # step 8 and 12 kept
    ckpts = run / "checkpoints"
    foreign = ckpts / "step00000002"                                         # another run's checkpoint
    shutil.copytree(ckpts / "step00000008", foreign)
    meta = json.loads((foreign / "agescale.json").read_text())
    (foreign / "agescale.json").write_text(json.dumps({**meta, "run_id": "another-run"}))
    foreign_before = _tree(foreign)
    _truncate(ckpts / "step00000012" / "mp_rank_00_model_states.pt")
    damaged_before = _tree(ckpts / "step00000012")
    first_rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "summary.json").unlink()

    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 20}), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "set aside" in r.stderr and "moved to" in r.stderr
    assert "skipped step00000012" in r.stderr and "step00000012/mp_rank_00_model_states.pt" in r.stderr
    assert json.loads((run / "run.json").read_text())["starts"][-1]["resumed_from"] == "step00000008"
    assert _tree(foreign) == foreign_before                                  # not this run's: untouched
    assert _tree(ckpts / "set_aside" / "step00000012") == damaged_before      # moved aside, not deleted
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002", "step00000016", "step00000020"]

    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for phase in ("train", "val"):
        steps = [row["step"] for row in rows if row["phase"] == phase]
        assert steps == sorted(set(steps)), phase                             # no step twice
    assert [row["step"] for row in rows if row["phase"] == "val"] == [4, 8, 12, 16, 20]
    assert sum(row["phase"] == "test" for row in rows) == 1
    moved = (run / "metrics.superseded.jsonl").read_text().splitlines()
    assert moved == [l for l in first_rows if json.loads(l)["step"] > 8]      # the re-run rows, kept aside
    assert len(moved) > 0


def test_resume_with_another_architecture_names_what_differs(utk_shards, base_run, tmp_path):
    from test_train import small

    run = copy_of(base_run, tmp_path / "run")
    before = _tree(run)
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 16, "model.backbone": "resnet34"}),
                "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = [l for l in r.stderr.splitlines() if l.startswith("agescale: error:")]
    assert len(line) == 1 and "step00000012" in line[0] and "model.backbone: 'resnet18' -> 'resnet34'" in line[0]
    assert _tree(run) == before                                              # nothing written or moved
    # A change that keeps every tensor's shape (dropout) resumes.
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 16, "model.drop_rate": 0.1}),
                "--resume")
    assert r.returncode == 0, r.stderr[-2000:]


def test_skipped_samples_are_counted_per_epoch_in_metrics_and_summary(shared_utkface, tmp_path):
    import json
    import shutil

    from data_pipeline.reader import ShardIndex

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(shared_utkface.glob("*.jpg"))[:120]:
        shutil.copy(f, src)
    shards = tmp_path / "shards"
    run_cli("shard", "--dataset", "utkface", "--src", src, "--out", shards, check=True)
    index = ShardIndex(shards, "train")
    ref = index.samples[3]
    tar = index.shards[ref.shard]
    data = bytearray(tar.read_bytes())
    off, size = ref.image
    data[off + 2:off + size] = bytes(size - 2)                                # undecodable, same size
    tar.write_bytes(bytes(data))
    run = tmp_path / "run"
    args = [f"data.loader.shards={shards}", "data.loader.image_size=32", "data.loader.batch_size=16",
            f"train.run_dir={run}", "train.epochs=2", "train.log_every_steps=2", "train.optimizer.warmup_steps=1"]
    r = run_cli("train", CONFIG, *args)
    assert r.returncode == 2 and ref.key in r.stderr                          # default: named and stopped
    r = run_cli("train", CONFIG, *args, "data.loader.on_bad_sample=skip", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    data_rows = [(row["epoch"], row["skipped_samples"], row["skipped_total"]) for row in rows if row["phase"] == "data"]
    assert data_rows == [(0, 1, 1), (1, 1, 2)]
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == 2
    assert "1 undecodable samples skipped" in r.stderr + r.stdout


@pytest.mark.parametrize("command", ["evaluate", "export", "tune", "slurm", "bench"])
@pytest.mark.parametrize("where", ["is_file", "under_file"])
def test_every_out_that_is_a_file_or_under_one_is_refused_up_front(command, where, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = blocker if where == "is_file" else blocker / "sub"
    if command == "slurm":                                                   # --out is a script file there
        out = (tmp_path if where == "is_file" else blocker / "job.sbatch")
    args = {"evaluate": ["evaluate", tmp_path / "no_run", "--data", tmp_path / "no_shards" / "test", "--out", out],
            "export": ["export", tmp_path / "no_run", "--out", out],
            "tune": ["tune", REPO / "configs" / "tune" / "demo.yaml", "--out", out],
            "slurm": ["slurm", CONFIG, "--out", out],
            "bench": ["bench", "predict", tmp_path / "no_bundle", "--out", out / "x.json" if where == "under_file"
                      else blocker]}[command]
    if command == "bench" and where == "is_file":
        args[-1] = tmp_path                                                  # a directory where a file goes
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and ("file" in lines[0] or "directory" in lines[0]), lines
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("override, named", [
    ("model.method_args.sigma=0", "model.method_args.sigma"),
    ("model.method_args.label_smoothing=1.5", "model.method_args.label_smoothing"),
    ("data.loader.std=[0.2,0,0.2]", "std"),
    ("model.min_age=90", "max_age"),
])
def test_inconsistent_or_out_of_range_settings_are_refused_at_load_time(override, named, tmp_path):
    method = {"sigma": "ldl", "label_smoothing": "dex"}.get(override.split(".")[-1].split("=")[0])
    extra = [f"model.method={method}"] if method else []
    if override.startswith("model.min_age"):
        extra.append("model.max_age=80")
    r = run_cli("train", CONFIG, f"train.run_dir={tmp_path / 'run'}", *extra, override)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and named in lines[0], r.stderr[-1500:]
    assert not (tmp_path / "run").exists()


def test_a_split_the_run_needs_but_the_shards_lack_is_refused_before_training(utk_shards, tmp_path):
    import json
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(utk_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["splits"]["test"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("train", CONFIG, f"data.loader.shards={shards}", f"train.run_dir={tmp_path / 'run'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "split(s) test" in lines[-1] and "train.test_at_end=false" in lines[-1]
    assert not (tmp_path / "run").exists()                                   # refused before any compute


@pytest.mark.slow
def test_kill_9_at_five_random_moments_then_resume_ends_like_an_uninterrupted_run(utk_shards, tmp_path):
    """kill -9 at 5 moments (3 at random times while training, 2 while a checkpoint is being
    written), --resume after each; the final run must equal an uninterrupted one exactly."""
    import json
    import random
    import signal
    import subprocess
    import time

    from conftest import AGESCALE
    from test_train import small

    opts = {"train.max_steps": 16, "train.ckpt_every_steps": 2}
    whole = tmp_path / "whole"
    run_cli("train", CONFIG, *small(utk_shards, whole, **opts), check=True)
    cut, rng, kills = tmp_path / "cut", random.Random(14), []
    ckpts = cut / "checkpoints"

    def saving() -> bool:  # a checkpoint folder whose save has not finished (no agescale.json yet)
        return any(p.is_dir() and not (p / "agescale.json").exists() for p in ckpts.glob("step*"))

    for i in range(5):
        args = [AGESCALE, "train", str(CONFIG), *small(utk_shards, cut, **opts)] + (["--resume"] if i else [])
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics, deadline = cut / "metrics.jsonl", time.time() + 300
        rows_before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        while proc.poll() is None and time.time() < deadline:  # until this start has trained a step
            if metrics.exists() and len(metrics.read_text().splitlines()) > rows_before:
                break
            time.sleep(0.01)
        during_save = i in (1, 3)
        until = time.time() + (5.0 if during_save else rng.uniform(0.0, 1.0))
        while proc.poll() is None and time.time() < until and not (during_save and saving()):
            time.sleep(0.002)
        if proc.poll() is None:
            kills.append("save" if during_save and saving() else "random")
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(kills) >= 4 and "save" in kills, kills                       # the moments really happened
    run_cli("train", CONFIG, *small(utk_shards, cut, **opts), "--resume", check=True)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a == b                                                            # weights' checksums, metrics: equal
    rows = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in rows if r["phase"] == "val"]
    assert val_steps == sorted(set(val_steps))                               # one run's rows
