"""Where this process sits in a job: from torchrun's variables, SLURM's, or neither (one
process). Nothing here starts a process group; trainer/distributed.py does."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | slurm | none

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "none"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` when available, else the
    common forms `node01`, `node[01-04,07]`, `a1,a2` parsed here."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"^([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else nodelist


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun inside a SLURM step)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per process
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                       int(env.get("MASTER_PORT", 29500)), "slurm")
    return DistEnv()
