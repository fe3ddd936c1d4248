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
