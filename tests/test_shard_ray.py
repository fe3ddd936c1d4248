"""`agescale shard --executor ray` on a real local Ray instance with 2 worker CPUs: the same bytes
as the local executor, a task whose worker dies is retried, and a run whose driver is killed
half-way continues with --resume, keeping the shards it had already written."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AGESCALE, REPO, run_cli

pytestmark = pytest.mark.slow

SAMPLE = REPO / "data" / "sample" / "utkface"  # 1,005 images
SMALL = "data.shard.max_samples_per_shard=40"   # ~26 shards, so there is a middle to kill in


def files(root: Path) -> dict[str, bytes]:
    """Every file of a shard set but config.yaml (it records the executor)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "config.yaml"}


def shard(out: Path, *extra, env=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([AGESCALE, "shard", "--dataset", "utkface", "--src", str(SAMPLE), "--out", str(out), SMALL,
                        "--workers", "2", *extra], capture_output=True, text=True, cwd=REPO, timeout=600,
                       env=dict(os.environ, **(env or {})))
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "shards"
    shard(out)
    return out


def test_ray_output_is_byte_identical_and_a_dead_task_is_retried(local, tmp_path):
    marker = tmp_path / "killed-once"
    out = tmp_path / "ray"
    shard(out, "--executor", "ray", env={"AGESCALE_TEST_KILL_SHARD": f"train-000003.tar:{marker}"})
    assert marker.exists()                                   # the worker really died once
    assert files(out) == files(local)                        # tars, DALI indexes, manifest: the same bytes
    assert not list(out.rglob("*.done.json"))                # records go once the manifest is there
    assert run_cli("verify", out).returncode == 0


def test_killed_driver_resumes_and_keeps_the_shards_already_written(local, tmp_path):
    out = tmp_path / "ray"
    proc = subprocess.Popen([AGESCALE, "shard", "--dataset", "utkface", "--src", str(SAMPLE), "--out", str(out), SMALL,
                             "--workers", "2", "--executor", "ray"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.rglob("*.done.json"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)                        # the driver only; its Ray leftovers are reaped
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = {p.name.removesuffix(".done.json"): (out / p.parent.name / p.name.removesuffix(".done.json")).stat().st_mtime_ns
            for p in out.rglob("*.done.json")}
    assert len(done) >= 5
    damaged = sorted(done)[0]                                # a record whose shard no longer checks out
    with next(out.rglob(damaged)).open("r+b") as f:
        f.truncate(1024)
    intact = {t: m for t, m in done.items() if t != damaged}
    r = shard(out, "--executor", "ray", "--resume")
    said = (r.stdout + r.stderr).split("resume: ")[1]
    assert int(said.split(" of ")[0]) >= len(intact)
    for tar, mtime in intact.items():                        # not written again
        assert next(out.rglob(tar)).stat().st_mtime_ns == mtime
    assert next(out.rglob(damaged)).stat().st_mtime_ns != done[damaged]
    assert files(out) == files(local)                        # the damaged one was written again
