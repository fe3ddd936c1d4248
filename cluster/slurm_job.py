"""`agescale slurm`: an sbatch script for a training config, from cluster/slurm/job.sbatch.in.

The script runs one srun task per node; each task is `torchrun` (c10d rendezvous on the first
node of the allocation, `--max-restarts` for worker failures) starting `agescale train --resume`,
so a requeued or restarted job continues from the run's latest checkpoint. GPU nodes get nccl and
its settings, CPU nodes gloo (through `train.device`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from base.errors import UserError
from trainer.run_config import load_config

TEMPLATE = Path(__file__).parent / "slurm" / "job.sbatch.in"

GPU_ENV = """\
# nccl between GPUs. A failed rank ends the job instead of hanging it until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# If NCCL picks the wrong network, name the fast interface, e.g.:
# export NCCL_SOCKET_IFNAME=ib0   NCCL_IB_HCA=mlx5"""
CPU_ENV = """\
# gloo between CPU processes. On nodes with several networks, name the one to use, e.g.:
# export GLOO_SOCKET_IFNAME=eth0"""


@dataclass
class JobSpec:
    config: Path
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    max_restarts: int = 1
    max_requeues: int = 5
    signal_lead: int = 120
    job_name: str | None = None


def _check(spec: JobSpec) -> None:
    if spec.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be >= 0, got {spec.gpus_per_node}")
    if spec.nproc_per_node is not None and spec.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {spec.nproc_per_node}")
    if spec.gpus_per_node and spec.nproc_per_node and spec.nproc_per_node > spec.gpus_per_node:
        raise UserError(f"--nproc-per-node {spec.nproc_per_node} exceeds --gpus-per-node {spec.gpus_per_node} "
                        f"(one process per GPU)")
    if spec.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", spec.time):
        raise UserError(f"--time {spec.time!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    if spec.max_restarts < 0 or spec.max_requeues < 0 or spec.signal_lead < 0:
        raise UserError("--max-restarts, --max-requeues and --signal-lead must be >= 0")


def render(spec: JobSpec, workdir: Path | None = None) -> tuple[str, Path]:
    """The script text and the run directory it trains into."""
    _check(spec)
    workdir = (workdir or Path.cwd()).resolve()
    device = "gpu" if spec.gpus_per_node else "cpu"
    overrides = [o for o in spec.overrides if not o.startswith("train.device=")] + [f"train.device={device}"]
    cfg = load_config(spec.config, overrides)  # fails here, not on the cluster, on a bad key
    run_dir = (workdir / cfg.train.run_dir).resolve()
    nproc = spec.nproc_per_node or spec.gpus_per_node or 1
    cpus = spec.cpus_per_task or (None if spec.gpus_per_node else nproc)
    resources = [f"#SBATCH --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node else None,
                 f"#SBATCH --cpus-per-task={cpus}" if cpus else None,
                 f"#SBATCH --time={spec.time}" if spec.time else None,
                 f"#SBATCH --partition={spec.partition}" if spec.partition else None]
    bin_dir = Path(sys.executable).parent
    values = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join(["agescale", "slurm", *sys.argv[2:]]) if sys.argv[1:2] == ["slurm"] else "agescale slurm",
        "job_name": spec.job_name or f"agescale-{run_dir.name}",
        "nodes": str(spec.nodes), "nproc": str(nproc),
        "sbatch_resources": "\n".join(r for r in resources if r),
        "log_dir": shlex.quote(str(run_dir / "slurm")), "run_dir": shlex.quote(str(run_dir)),
        "workdir": shlex.quote(str(workdir)), "signal_lead": str(spec.signal_lead),
        "max_requeues": str(spec.max_requeues), "max_restarts": str(spec.max_restarts),
        "backend_env": GPU_ENV if spec.gpus_per_node else CPU_ENV,
        # This environment's own launchers: the nodes must see the same path (a shared filesystem).
        "torchrun": shlex.quote(str(bin_dir / "torchrun")), "agescale": shlex.quote(str(bin_dir / "agescale")),
        "config": shlex.quote(str(spec.config.resolve())),
        "overrides": " ".join(shlex.quote(o) for o in overrides),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{\w+\}\}", text)
    assert not leftover, f"unfilled template fields {leftover}"
    return text, run_dir


def write(spec: JobSpec, out: Path | None) -> tuple[Path, Path]:
    text, run_dir = render(spec)
    path = out or run_dir / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch needs the log folder to exist
    path.write_text(text)
    path.chmod(0o755)
    return path, run_dir


def submit(script: Path) -> int:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run on a SLURM login node (or start the local test cluster with "
                        "cluster/slurm/local_cluster.sh up and export SLURM_CONF as it says)")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"sbatch {script} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return int(proc.stdout.strip().split(";")[0])
