"""The CLI's help on every subcommand, and the benchmarks' JSON (shape and arithmetic, not speed)."""

import json

import pytest

import fixtures
from conftest import run_cli
from trainer.precision import native_bf16


def _commands(parser=None, prefix=()) -> list[list[str]]:
    """Every subcommand path, read from the parser itself (a new command cannot be missed)."""
    import argparse

    from launch.cli import build_parser

    parser = parser or build_parser()
    out = [list(prefix)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*prefix, name))
    return out


def test_the_command_list_is_complete():
    names = {" ".join(c) for c in _commands()}
    assert {"tune", "slurm", "train", "evaluate", "export", "predict", "serve", "bench predict", "bench serve",
            "bench detect"} <= names


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c) or "agescale")
def test_every_subcommand_has_help(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "usage: agescale" in r.stdout and len(r.stdout.splitlines()) > 4


def test_bench_shard_json(tmp_path, sample_jpegs):
    src = tmp_path / "src"
    for f in sample_jpegs[:200]:
        fixtures.put(f, src / f.name)
    r = run_cli("bench", "shard", "--src", src, "--rounds", "3", "--out", tmp_path / "b.json", check=True)
    out = json.loads((tmp_path / "b.json").read_text())
    assert out == json.loads(r.stdout) and out["images"] == 200 and out["target"] == 0.8
    assert all(len(v) == 3 for v in out["rounds_img_s"].values())
    assert out["agescale_shard_img_s"] == sorted(out["rounds_img_s"]["shard"])[1]      # the median round
    assert out["ratio"] == pytest.approx(out["agescale_shard_img_s"] / out["bare_decode_img_s"], rel=0.01)
    assert out["overhead_ratio"] == pytest.approx(out["agescale_shard_img_s"] / out["bare_check_img_s"], rel=0.01)
    assert set(out["rounds_img_s"]) == {"decode", "check", "shard", "tar"}


def test_bench_shard_synthetic_scale_json(tmp_path):
    r = run_cli("bench", "shard", "--synthetic", "1500", "--out", tmp_path / "s.json", check=True)
    out = json.loads((tmp_path / "s.json").read_text())
    assert out == json.loads(r.stdout)
    assert [s["images"] for s in out["sizes"]] == [1500] and out["sizes"][0]["img_s"] > 0
    assert abs(out["loader"]["samples"] - 1500 * 0.9) <= 10 and out["loader"]["startup_s"] > 0
    assert out["sizes"][0]["driver_peak_rss_mb"] > 20 and out["sizes"][0]["manifest_bytes_per_sample"] > 0


def test_bench_loader_json(utk_shards, tmp_path):
    run_cli("bench", "loader", "--shards", utk_shards, "--images", "128", "--rounds", "2", "--out", tmp_path / "l.json",
            check=True)
    out = json.loads((tmp_path / "l.json").read_text())
    rows = {(r["backend"], r["size"], r["augment"]): r for r in out["results"]}
    assert len(rows) == 10 and all(len(r["rounds"]) == 2 and r["img_s"] > 0 for r in rows.values())
    assert all(r["img_s"] == pytest.approx(sum(r["rounds"]) / 2) for r in rows.values())  # median of two
    img_s = {k: r["img_s"] for k, r in rows.items()}
    assert out["target"] == 2.0 and out["dali_augment_vs_decode_resize_target"] == 0.8
    assert out["ratio"] == pytest.approx(img_s[("dali-cpu", 112, "default")] / img_s[("torch", 112, "default")], rel=0.01)
    assert out["dali_augment_vs_decode_resize"] == pytest.approx(
        img_s[("dali-cpu", 112, "default")] / img_s[("dali-cpu", 112, "none")], rel=0.01)
    assert out["fused_kernel_vs_dali_operators"] == pytest.approx(
        img_s[("dali-cpu", 112, "default")] / img_s[("dali-cpu-ops", 112, "default")], rel=0.01)


def test_bench_with_missing_source_is_one_line(tmp_path):
    r = run_cli("bench", "shard", "--src", tmp_path / "nope")
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def test_bench_train_json(tmp_path):
    # A CPU without native bf16 emulates the autocast rows ~20x slower (448 s for 10 steps on a 2-core
    # AVX2 EPYC); there fewer steps keep the test short and still time every row.
    steps = "10" if native_bf16() else "3"
    run_cli("bench", "train", "--steps", steps, "--batch", "8", "--image-size", "32", "--rounds", "2", "--autocast",
            "--out", tmp_path / "t.json", check=True)
    out = json.loads((tmp_path / "t.json").read_text())
    rows = {r["row"]: r for r in out["results"]}
    assert set(rows) == {"bare", "trainer", "bare_autocast", "trainer_autocast"}
    assert out["rounds"] == 2 and out["target"] == 1.05
    # Ratios are reported to 3 decimals: allow that rounding (5e-4) as well as 1 % of the value.
    assert out["autocast_ratio"] == pytest.approx(rows["trainer_autocast"]["step_s"] / rows["bare_autocast"]["step_s"],
                                                  rel=0.01, abs=6e-4)
    assert out["autocast_speedup"] == pytest.approx(rows["trainer"]["step_s"] / rows["trainer_autocast"]["step_s"],
                                                    rel=0.01, abs=6e-4)
    for r in rows.values():                                  # the reported value is the median of the rounds
        assert len(r["rounds_step_s"]) == 2 and all(x > 0 for x in r["rounds_step_s"])
        assert r["step_s"] == pytest.approx(sum(r["rounds_step_s"]) / 2, abs=1e-4)
    assert out["bare_step_s"] == rows["bare"]["step_s"] and out["trainer_step_s"] == rows["trainer"]["step_s"]
    assert out["ratio"] == pytest.approx(out["trainer_step_s"] / out["bare_step_s"], rel=0.01, abs=6e-4)
