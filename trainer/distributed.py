"""Start the process group for DeepSpeed: gloo on CPU, nccl on GPU, from torchrun or SLURM
variables (cluster/env.py), or a one-process group on a free loopback port."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from cluster.env import DistEnv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warn_restart_hang() -> None:
    """torchrun shares its rendezvous TCPStore with the workers by default, and workers it restarts
    (--max-restarts) then hang in init_process_group on stale keys (pytorch/pytorch#135712; seen
    here with torch 2.14 and gloo). The fix is an environment variable torchrun itself must see."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and os.environ.get("RANK") == "0":
        logging.getLogger("agescale").warning(
            "torchrun --max-restarts is set but TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not 1: restarted workers "
            "can hang (pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")


def init(env: DistEnv, device: str) -> None:
    import deepspeed

    if dist.is_initialized():
        return
    _warn_restart_hang()
    if env.launcher == "none":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    else:
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    if device == "gpu":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device == "gpu" else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(minutes=30), verbose=False)


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """A collective's tensor on the device its backend needs (nccl: the GPU; gloo: the CPU)."""
    return t.cuda() if dist.get_backend() == "nccl" else t


def all_true(flag: bool) -> bool:
    """True when the flag is set on any rank (so all ranks act together, e.g. on SIGTERM)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag  # nothing to agree on: skip the per-step collective
    t = _on_backend(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank0_value(value: int) -> int:
    """Rank 0's integer on every rank (e.g. a step count each rank estimated from its own timings)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = _on_backend(torch.tensor([value], dtype=torch.int64))
    dist.broadcast(t, src=0)
    return int(t.item())
