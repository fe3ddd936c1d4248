"""Training-speed and weight-averaging levers that wrap the model: intra-op threads,
`torch.compile` through DeepSpeed's engine (with eager fallback), and the EMA of the weights."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("agescale")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def to_channels_last(engine, zero_stage: int) -> None:
    """NHWC weights (inputs are converted per batch by the trainer): oneDNN's convolutions run
    6-17 % faster on these CPUs. Done after `deepspeed.initialize`, whose parameter broadcast
    needs contiguous tensors; `Module.to` keeps the Parameter objects, so the optimizer still
    holds them. ZeRO 1/2 flatten parameters into their own buffers, so there only the inputs
    go NHWC."""
    if zero_stage == 0:
        engine.module.to(memory_format=torch.channels_last)
    else:
        log.info("train.channels_last with ZeRO %d: inputs only (ZeRO owns the parameter storage)", zero_stage)


def compile_engine(engine) -> bool:
    """Compile the engine's module with inductor (DeepSpeed's `engine.compile`). Dynamo's
    `suppress_errors` runs a graph that fails to compile eagerly and logs why; a torch or
    DeepSpeed without compile support is logged and training goes on eagerly. Returns whether
    compilation was set up."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a failing graph falls back to eager, with a warning
    try:
        engine.compile(backend="inductor")
    except Exception as e:  # noqa: BLE001 (any reason compile is unavailable: log it, train eagerly)
        log.warning("train.compile: falling back to eager (%s: %s)", type(e).__name__, e)
        return False
    return True


def make_ema(module: torch.nn.Module, decay: float | None):
    """timm's ModelEmaV3 with warm-up (decay ramps up from 0, so early weights fade fast),
    or None when `train.ema_decay` is null."""
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    # float32 whatever the training precision: a bf16 EMA at decay 0.999 loses most updates,
    # and timm's bf16 path draws stochastic rounding from an RNG that checkpoints do not hold.
    return ModelEmaV3(module, decay=decay, use_warmup=True, warmup_power=3 / 4, dtype=torch.float32)
