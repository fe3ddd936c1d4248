"""Bad inputs that used to pass silently or end in a traceback: each gets a one-line error
naming the key or flag, before any compute, and exits non-zero."""

from __future__ import annotations

import pytest

from conftest import REPO, SAMPLE, run_cli

CONFIG = REPO / "configs" / "experiments" / "demo_cpu.yaml"


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


def test_a_diverging_run_stops_with_an_error_and_keeps_its_checkpoint(utk_shards, tmp_path):
    from test_train import small

    run = tmp_path / "run"
    run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 4}), check=True)
    before = (run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt").read_bytes()
    (run / "summary.json").unlink()
    # A loss weight that makes every loss overflow to inf: the resumed run must not apply it.
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 12, "model.age_weight": 1e38,
                                                            "train.max_nonfinite_steps": 3}), "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    msg = [l for l in r.stderr.splitlines() if l.startswith("agescale: error:")]
    assert len(msg) == 1 and "training diverged" in msg[0] and "3 consecutive batches after step 4" in msg[0]
    assert "step00000004" in msg[0]
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step00000004"
    assert (run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt").read_bytes() == before
    assert not (run / "summary.json").exists()


def test_an_existing_run_is_never_trained_over_without_resume_or_overwrite(utk_shards, tmp_path):
    from test_train import small

    run = tmp_path / "run"
    args = small(utk_shards, run, **{"train.max_steps": 4})
    run_cli("train", CONFIG, *args, check=True)
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


def test_resume_takes_the_newest_intact_checkpoint_and_says_why(utk_shards, tmp_path):
    import json
    import shutil

    from test_train import small

    base = tmp_path / "base"
    run_cli("train", CONFIG, *small(utk_shards, base), check=True)          # checkpoints step 8 and 12 kept
    cases = {
        "garbage_latest": (lambda r: (r / "checkpoints" / "LATEST").write_bytes(b"\x00garbage\xff"),
                           "step00000012", "LATEST"),
        "dangling_latest": (lambda r: (r / "checkpoints" / "LATEST").write_text("step00000004\n"),
                            "step00000012", "step00000004"),
        "truncated_newest": (lambda r: _truncate(r / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"),
                             "step00000008", "step00000012/mp_rank_00_model_states.pt"),
    }
    for name, (damage, expect, named) in cases.items():
        run = tmp_path / name
        shutil.copytree(base, run)
        (run / "summary.json").unlink()
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
