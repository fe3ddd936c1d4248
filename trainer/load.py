"""Load a trained model from a run directory or a checkpoint, with the run's config.

Accepted: a run directory (its best model), `run/best/model.safetensors`, or a DeepSpeed
checkpoint tag directory `run/checkpoints/stepN`. For ZeRO 0-2 every checkpoint holds the
whole model on rank 0's file, so the weights are consolidated whatever the stage was.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from base.errors import UserError
from trainer import checkpoint
from trainer.models import AgeModel, create_model
from trainer.run_config import Config, load_config


def run_dir_of(path: Path) -> Path:
    for p in (path, *path.parents):
        if (p / "config.yaml").exists() and (p / "run.json").exists():
            return p
    raise UserError(f"{path}: not inside an agescale run directory (no config.yaml + run.json above it)")


def load_trained(path: Path) -> tuple[Config, AgeModel, Path]:
    """(config, model in eval mode, the weights file used)."""
    if not path.exists():
        raise UserError(f"{path}: no such run or checkpoint")
    run = run_dir_of(path)
    cfg = load_config(run / "config.yaml", ["model.weights=scratch"])
    if path.is_dir() and (path / "mp_rank_00_model_states.pt").exists():
        weights = path / "mp_rank_00_model_states.pt"
        why = checkpoint.damage(path.parent, path.name)
        if why is not None and (path / checkpoint.META).exists():
            raise UserError(f"{why}; use another checkpoint or the run's best/")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=False)["module"]
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on a damaged file
            raise UserError(f"{weights}: unreadable checkpoint file ({type(e).__name__})") from None
    else:
        weights = path if path.is_file() else run / "best" / "model.safetensors"
        if not weights.exists():
            raise UserError(f"{run}: no best/model.safetensors (did the run validate at least once?)")
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or foreign files
            raise UserError(f"{weights}: unreadable weights file ({type(e).__name__}: {str(e)[:120]})") from None
    model = create_model(cfg.model, cfg.data.loader.image_size)
    own = model.state_dict()
    try:
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{weights}: does not match the run's model ({e})") from None
    return cfg, model.eval(), weights
