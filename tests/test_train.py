"""Trainer on CPU with real DeepSpeed engines, through `agescale train` and `torchrun`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import AGESCALE, REPO, run_cli

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
CONFIG = REPO / "configs" / "experiments" / "demo_cpu.yaml"


def small(utk_shards, run_dir, **extra) -> list[str]:
    """A tiny but real run: ResNet-18 at 32 px, batches of 16, validation every 4 steps."""
    base = {"data.loader.shards": utk_shards, "data.loader.image_size": 32, "data.loader.batch_size": 16,
            "train.run_dir": run_dir, "train.max_steps": 12, "train.val_every_steps": 4,
            "train.ckpt_every_steps": 4, "train.log_every_steps": 2, "train.optimizer.warmup_steps": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, extra=(), timeout=600) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, f"--nproc-per-node={nproc}", *extra, "--no-python", AGESCALE, "train", str(CONFIG), *args]
    if not any(a.startswith("--nnodes") for a in extra):
        cmd[2:2] = ["--master-port", str(free_port())]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_single_process_run_writes_everything(utk_shards, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.optimizer.warmup_steps": 4}))
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(run)
    assert s["steps"] == 12 and s["world_size"] == 1 and s["test"]["count"] == 599
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["phase"] == "val"] == [4, 8, 12]
    train_lines = [l for l in lines if l["phase"] == "train"]
    assert len(train_lines) == 6 and all(l["images_per_s"] > 0 and l["loss"] == l["loss"] for l in train_lines)
    lrs = [l["lr"] for l in train_lines]                                    # after steps 2, 4, ..., 12
    assert lrs[0] == pytest.approx(0.002 * 3 / 4) and lrs[1] == pytest.approx(0.002)   # linear warmup
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))                     # then cosine decay
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert best["mae"] == pytest.approx(s["best_val_mae"]) == min(l["mae"] for l in lines if l["phase"] == "val")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 12 and cfg["data"]["loader"]["image_size"] == 32
    info = json.loads((run / "run.json").read_text())
    assert len(info["data_manifest_sha256"]) == 64
    assert (info["starts"][0]["precision"], info["starts"][0]["precision_reason"]) == ("fp32", "set in train.precision")
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step00000012"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert f"test MAE: {s['test']['mae']:.2f}" in r.stdout


# kill -9 + --resume = an uninterrupted run: tests/test_faults.py (five kills, two during a save).


@pytest.mark.parametrize("zero", [0])  # ZeRO 2 at two ranks: test_zero2_checkpoint_moves_from_two_ranks_to_one_and_back
def test_two_ranks_stay_in_sync(utk_shards, tmp_path, zero):
    """...and `train.precision=auto` picks this CPU's precision (read here from /proc/cpuinfo
    on its own), once for both ranks, recorded in run.json and said on stderr."""
    run = tmp_path / "run"
    r = torchrun(*small(utk_shards, run, **{"train.zero_stage": zero, "train.max_steps": 6,
                                            "train.precision": "auto"}))
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(run)
    assert s["world_size"] == 2 and len(s["param_checksums"]) == 2
    assert s["param_checksums"][0] == s["param_checksums"][1]
    flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "").split()
    expected = "bf16_autocast" if {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"
    assert json.loads((run / "run.json").read_text())["starts"][0]["precision"] == expected
    assert r.stderr.count(f"agescale: train.precision=auto: {expected} (this CPU has") == 1


def test_two_node_rendezvous_on_loopback(utk_shards, tmp_path):
    run, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes=2", f"--node-rank={i}", "--nproc-per-node=1",
                               "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python", AGESCALE, "train",
                               str(CONFIG), *small(utk_shards, run, **{"train.max_steps": 4})],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    s = summary(run)
    assert s["world_size"] == 2 and s["steps"] == 4 and s["param_checksums"][0] == s["param_checksums"][1]


def test_zero2_checkpoint_moves_from_two_ranks_to_one_and_back(utk_shards, tmp_path):
    run = tmp_path / "run"
    opts = lambda steps: small(utk_shards, run, **{"train.zero_stage": 2, "train.max_steps": steps,  # noqa: E731
                                                   "train.test_at_end": "false"})
    assert torchrun(*opts(4)).returncode == 0
    r = run_cli("train", CONFIG, *opts(8), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(*opts(12), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert [(s["world_size"], s["step"]) for s in starts] == [(2, 0), (1, 4), (2, 8)]
    s = summary(run)
    assert s["steps"] == 12 and s["world_size"] == 2 and s["param_checksums"][0] == s["param_checksums"][1]


def test_sigterm_checkpoints_and_exits_75_then_resumes(utk_shards, tmp_path):
    run = tmp_path / "run"
    args = small(utk_shards, run, **{"train.max_steps": 400, "train.ckpt_every_steps": 1000,
                                     "train.val_every_steps": 1000, "train.test_at_end": "false"})
    proc = subprocess.Popen([AGESCALE, "train", str(CONFIG), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75
    tag = (run / "checkpoints" / "LATEST").read_text().strip()
    stopped_at = int(tag.removeprefix("step"))
    assert 4 <= stopped_at < 400 and not (run / "summary.json").exists()
    r = run_cli("train", CONFIG, *args[:-4], f"train.max_steps={stopped_at + 2}", "train.test_at_end=false",
                "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run)["steps"] == stopped_at + 2


def test_user_errors_are_one_line(utk_shards, tmp_path):
    r = run_cli("train", CONFIG, *small(utk_shards, tmp_path / "r"), "train.zero_stage=3")
    assert r.returncode == 2 and "train.zero_stage" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", CONFIG, *small(tmp_path / "no-shards", tmp_path / "r"))
    assert r.returncode == 2 and "no-shards: no manifest.json" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "missing.yaml: not found" in r.stderr
    if not torch.cuda.is_available():
        r = run_cli("train", CONFIG, *small(utk_shards, tmp_path / "r"), "train.device=gpu")
        assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
def test_gpu_training_with_mixed_decode(utk_shards, tmp_path):
    """The production path: DALI `mixed` decode, nccl, bf16. Needs a GPU (skipped here)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    run = tmp_path / "run"
    r = run_cli("train", CONFIG, *small(utk_shards, run, **{"train.device": "gpu", "data.loader.device": "gpu",
                                                             "train.precision": "bf16", "train.max_steps": 8}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run)["steps"] == 8 and summary(run)["test"]["mae"] < 60
