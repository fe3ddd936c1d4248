"""`train.precision: auto`: the precision this machine trains fastest in, chosen at start-up.

bf16 autocast is the recipes' CPU choice only where the CPU computes bf16 natively (AVX512-BF16 or
AMX-BF16): there it trained 1.5x faster than fp32 (README). Without it PyTorch emulates bf16: on a
2-core AMD EPYC with AVX2 only (2026-12-07) a training step ran 17x (ResNet-18-D, 112 px, batch
32, a bare loop) to 26x (`agescale bench train --autocast`: ResNet-18, 64 px, batch 32) slower in
autocast than in fp32, so a recipe pinned to bf16_autocast would silently spend its
hour on a few hundred steps. torch exposes no bf16 query for the CPU, so the flags are read from
/proc/cpuinfo (Linux); elsewhere the answer is "not native".
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PRECISIONS = ("fp32", "bf16", "bf16_autocast")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):  # the first processor's; the cores of one machine agree
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def flag_names() -> str:
    return " or ".join(NATIVE_BF16_FLAGS)


def gpu_has_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve(precision: str, device: str, flags: set[str] | None = None,
            gpu_bf16: bool | None = None) -> tuple[str, str]:
    """(the precision to train in, why): `auto` becomes bf16 on a GPU that computes it (Ampere
    and later), fp32 on an older one, bf16_autocast on a CPU with native bf16 and fp32 on any
    other CPU; an explicit choice is kept."""
    if precision != "auto":
        return precision, "set in train.precision"
    if device == "gpu":
        if gpu_has_bf16() if gpu_bf16 is None else gpu_bf16:
            return "bf16", "auto: this GPU computes bf16"
        return "fp32", "auto: this GPU has no native bf16 (before Ampere)"
    flags = cpu_flags() if flags is None else flags
    if native_bf16(flags):
        native = ", ".join(f for f in NATIVE_BF16_FLAGS if f in flags)
        return "bf16_autocast", f"auto: this CPU has native bf16: {native}"
    return "fp32", f"auto: this CPU has no native bf16: no {flag_names()} in /proc/cpuinfo"
