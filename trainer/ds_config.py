"""The DeepSpeed JSON, generated from the run config (the one source of truth); an advanced
user's own JSON (train.deepspeed_config) is merged over it."""

from __future__ import annotations

import json
from pathlib import Path

from base.errors import UserError
from trainer.config import TrainConfig
from trainer.precision import PRECISIONS


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, micro_batch: int, precision: str | None = None) -> dict:
    """`precision`: the resolved train.precision (trainer/precision.py); None = the config's own."""
    precision = cfg.precision if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision} must be resolved first (trainer.precision.resolve)")
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # DeepSpeed's own autocast: the engine's forward runs under torch.autocast (convs and
        # Linears compute in bf16, activations stay bf16 between them; weights, optimizer state
        # and BatchNorm statistics stay fp32). An empty list of "lower precision safe" modules
        # keeps ZeRO 1/2 from reducing those modules' gradients in bf16.
        "torch_autocast": {"enabled": precision == "bf16_autocast", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "steps_per_print": 2 ** 31 - 1,  # agescale logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            ds = _merge(ds, json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"train.deepspeed_config {path}: {e}") from None
    return ds
