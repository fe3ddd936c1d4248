"""scripts/gpu_check.sh on a machine without CUDA: it must stop at once with one line, before
it builds shards or starts anything (the GPU steps themselves need a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import REPO


def test_gpu_check_without_cuda_exits_at_once_with_one_line(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PATH="/usr/bin:/bin")  # no nvidia-smi on this PATH
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert time.monotonic() - t0 < 10 and not (tmp_path / "out").exists()
