"""timm backbones by name; weights from scratch, a local file the user names, or the hub."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from base.errors import UserError


def create_backbone(name: str, image_size: int, weights: str = "scratch", drop_rate: float = 0.0,
                    **timm_args) -> nn.Module:
    """A timm model without its classifier (num_classes=0). `weights='hub'` downloads and is
    for machines that can; nothing else here touches the network. `timm_args` go to
    `timm.create_model` (a family's patch or window size)."""
    if name not in timm.list_models():
        raise UserError(f"model.backbone {name!r} is not a timm model (e.g. resnet18, swin_tiny_patch4_window7_224)")
    kwargs = {"num_classes": 0, "drop_rate": drop_rate, **timm_args}
    if name.startswith(("swin", "volo")):
        kwargs["img_size"] = image_size  # their token grids, windows and position embeddings follow the input
    try:
        model = timm.create_model(name, pretrained=weights == "hub", **kwargs)
    except (AssertionError, ValueError) as e:
        raise UserError(f"model.backbone {name} at image size {image_size}: {e}") from None
    if weights not in ("scratch", "hub"):
        load_weights(model, Path(weights))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict (.pth/.pt or .safetensors); classifier keys that a headless model
    lacks are ignored, any other mismatch is an error naming the keys."""
    if not path.is_file():
        raise UserError(f"model.weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as e:  # torch and safetensors raise several types for a bad file
        raise UserError(f"model.weights {path}: not a readable state dict ({type(e).__name__}: {e})") from None
    head = {k for k in state if k.split(".")[0] in ("fc", "head", "classifier")}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if missing or unexpected:
        raise UserError(f"model.weights {path}: does not fit the backbone (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
