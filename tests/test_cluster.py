"""SLURM jobs from `agescale slurm` on the real local cluster (cluster/slurm/local_cluster.sh),
and torchrun's elastic restart after a worker dies. CPU, gloo, shards of the shared images."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGESCALE, REPO, run_cli

CONFIG = REPO / "configs" / "experiments" / "demo_cpu.yaml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SLURM_DIR = Path(os.environ.get("AGESCALE_SLURM_DIR", "/tmp/agescale-slurm"))


def tiny(shards, run_dir, steps: int, **extra) -> list[str]:
    base = {"data.loader.shards": shards, "data.loader.image_size": 32, "data.loader.batch_size": 16,
            "train.run_dir": run_dir, "train.max_steps": steps, "train.val_every_steps": 4,
            "train.ckpt_every_steps": 4, "train.log_every_steps": 2, "train.optimizer.warmup_steps": 2,
            "train.test_at_end": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def val_steps(run_dir: Path) -> list[int]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [l["step"] for l in lines if l["phase"] == "val"]


# ------------------------------------------------------------------ the generated script

def test_script_for_gpu_nodes(tmp_path):
    out = tmp_path / "job.sbatch"
    r = run_cli("slurm", CONFIG, "--nodes", 4, "--gpus-per-node", 8, "--time", "12:00:00", "--partition", "gpu",
                "--out", out, f"train.run_dir={tmp_path / 'run'}", "train.epochs=3")
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --signal=B:SIGTERM@120",
                 "#SBATCH --requeue", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "--nnodes=4 --nproc-per-node=8 --max-restarts=1", "--rdzv-backend=c10d",
                 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%j.out"):
        assert line in text, line
    assert re.search(r"agescale train \S+demo_cpu.yaml --resume .*train.epochs=3 train.device=gpu", text)
    assert "--cpus-per-task" not in text and "gloo" not in text
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0


def test_script_errors_name_the_problem(tmp_path):
    r = run_cli("slurm", CONFIG, "--gpus-per-node", 2, "--nproc-per-node", 4, "--out", tmp_path / "a")
    assert r.returncode == 2 and "--nproc-per-node 4 exceeds --gpus-per-node 2" in r.stderr
    r = run_cli("slurm", CONFIG, "--out", tmp_path / "b", "train.epocs=3")
    assert r.returncode == 2 and "train.epocs" in r.stderr and "did you mean 'train.epochs'" in r.stderr
    r = run_cli("slurm", CONFIG, "--time", "soon", "--out", tmp_path / "c")
    assert r.returncode == 2 and "--time 'soon'" in r.stderr
    assert not any((tmp_path / n).exists() for n in "abc")


# ------------------------------------------------------------------ elastic restart (torchrun only)

def test_killed_worker_restarts_from_checkpoint_under_max_restarts(utk_shards, tmp_path):
    run = tmp_path / "run"
    port = 29000 + os.getpid() % 1000
    proc = subprocess.Popen([TORCHRUN, "--nnodes=1", "--nproc-per-node=2", "--max-restarts=1",
                             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--no-python",
                             AGESCALE, "train", str(CONFIG), "--resume", *tiny(utk_shards, run, 40)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))  # see the README
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "LATEST").exists():
        time.sleep(0.2)
    tag = (run / "checkpoints" / "LATEST").read_text().strip()
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 2
    assert summary["param_checksums"][0] == summary["param_checksums"][1]
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert len(starts) == 2 and starts[1]["resumed_from"] is not None and starts[1]["resumed_from"] >= tag
    steps = val_steps(run)
    assert steps[-1] == 40 and max(steps) == 40


# ------------------------------------------------------------------ the real SLURM cluster

@pytest.fixture(scope="module")
def slurm_env() -> dict:
    env = dict(os.environ, SLURM_CONF=str(SLURM_DIR / "slurm.conf"))
    up = (SLURM_DIR / "slurm.conf").exists() and subprocess.run(
        ["scontrol", "ping"], env=env, capture_output=True, text=True).returncode == 0
    if not up:
        why = f"no local SLURM cluster at {SLURM_DIR} (start it with cluster/slurm/local_cluster.sh up)"
        if os.environ.get("AGESCALE_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)
    return env


def job_field(job: int, env: dict, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", text)
    return m.group(1) if m else ""


def wait_for(job: int, env: dict, until, timeout: float = 420, fail_fast: bool = True) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if until():
            return
        state = job_field(job, env, "JobState")
        if fail_fast and state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job} ended {state}")
        time.sleep(1)
    raise AssertionError(f"job {job}: timed out in state {job_field(job, env, 'JobState')}")


def submit(env: dict, *args) -> int:
    r = subprocess.run([AGESCALE, "slurm", str(CONFIG), "--submit", *map(str, args)], env=env, cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(re.search(r"submitted job (\d+)", r.stdout).group(1))


@pytest.mark.slurm
def test_job_of_one_node_two_processes_completes(slurm_env, utk_shards, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm_env, "--nodes", 1, "--nproc-per-node", 2, *tiny(utk_shards, run, 12))
    wait_for(job, slurm_env, lambda: job_field(job, slurm_env, "JobState") == "COMPLETED")
    assert job_field(job, slurm_env, "ExitCode") == "0:0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 2
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step00000012"
    assert val_steps(run) == [4, 8, 12]
    node_log = (run / "slurm" / f"{job}-{os.uname().nodename.split('.')[0]}.log").read_text()
    assert f"best validation MAE: {summary['best_val_mae']:.2f}" in node_log
    assert "srun ended with code 0" in (run / "slurm" / f"{job}.out").read_text()


@pytest.mark.slurm
def test_sigterm_checkpoints_requeues_and_finishes(slurm_env, utk_shards, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm_env, "--nodes", 1, "--nproc-per-node", 2, *tiny(utk_shards, run, 40, **{"train.val_every_steps": 8}))
    wait_for(job, slurm_env, lambda: (run / "checkpoints" / "LATEST").exists())
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=slurm_env, check=True)
    # The trainers checkpoint and exit; the batch script requeues the job.
    # (while SLURM requeues it, the job passes through states that look final: no fail-fast here)
    wait_for(job, slurm_env, lambda: job_field(job, slurm_env, "Restarts") == "1", timeout=120, fail_fast=False)
    stop = json.loads((run / "preempted.json").read_text())
    assert stop["signal"] == "SIGTERM" and stop["checkpoint"] == f"step{stop['step']:08d}"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == stop["checkpoint"]
    assert not (run / "summary.json").exists()
    node_log = (run / "slurm" / f"{job}-{os.uname().nodename.split('.')[0]}.log").read_text()
    assert f"stopped by SIGTERM at step {stop['step']}; checkpoint {stop['checkpoint']} saved" in node_log
    # A requeued job waits ~2 minutes (BeginTime) before SLURM starts it again. Skip the wait,
    # but only once it is pending and a second has passed: the requeue revokes the old launch
    # credential with one-second resolution, and a relaunch within that second fails the job
    # ("Killing non-startable batch job: Job credential revoked", seen once in slurmctld.log).
    wait_for(job, slurm_env, lambda: job_field(job, slurm_env, "JobState") == "PENDING", timeout=60,
             fail_fast=False)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, capture_output=True)
    wait_for(job, slurm_env, lambda: job_field(job, slurm_env, "JobState") == "COMPLETED")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world_size"] == 2
    starts = json.loads((run / "run.json").read_text())["starts"]
    assert [s["resumed_from"] for s in starts] == [None, stop["checkpoint"]]
    assert not (run / "preempted.json").exists()
    assert "requeueing job" in (run / "slurm" / f"{job}.out").read_text()
