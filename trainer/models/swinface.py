"""The SwinFace family (Qin et al., "SwinFace: A Multi-task Transformer for Face Recognition,
Expression Recognition, Age Estimation and Attribute Estimation", 2023): a Swin-T sized for
small face crops whose four stages all feed one multi-level channel-attention (MLCA) branch per
task.

Written here because timm has the Swin-T but not SwinFace's branches. Our reading of the paper:
stage 1-3 maps are average-pooled to stage 4's grid and kept as separate levels; a branch gives
each level its own 3x3 conv, joins them, gates the channels (average- and max-pooled vectors
through one shared MLP, summed, sigmoid), pools, applies BatchNorm and runs a task subnet of two
Linear+ReLU+Dropout blocks; the task's head follows in the age model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import SwinFaceArgs
from trainer.models.backbone import create_backbone


class MLCABranch(nn.Module):
    def __init__(self, level_channels: list[int], args: SwinFaceArgs):
        super().__init__()
        c = args.level_channels
        self.level_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            for ch in level_channels)
        joined = c * len(level_channels)
        hidden = max(joined // args.gate_reduction, 8)
        self.gate = nn.Sequential(nn.Linear(joined, hidden), nn.ReLU(), nn.Linear(hidden, joined))
        self.norm = nn.BatchNorm1d(joined)
        h, p = args.subnet_hidden, args.subnet_dropout
        self.subnet = nn.Sequential(nn.Linear(joined, h), nn.ReLU(), nn.Dropout(p),
                                    nn.Linear(h, h), nn.ReLU(), nn.Dropout(p))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([conv(level) for conv, level in zip(self.level_convs, levels)], dim=1)
        gate = torch.sigmoid(self.gate(x.mean((2, 3))) + self.gate(x.amax((2, 3))))
        x = x * gate[:, :, None, None]
        return self.subnet(self.norm(x.mean((2, 3))))


class SwinFace(nn.Module):
    """forward(x) → {task: (N, subnet_hidden)} for each of `tasks`."""

    def __init__(self, name: str, image_size: int, tasks: list[str], args: SwinFaceArgs,
                 weights: str = "scratch", drop_rate: float = 0.0):
        super().__init__()
        self.swin = create_backbone(name, image_size, weights, drop_rate,
                                    patch_size=args.patch_size, window_size=args.window_size)
        channels = [info["num_chs"] for info in self.swin.feature_info]
        self.branches = nn.ModuleDict({t: MLCABranch(channels, args) for t in tasks})
        self.num_features = args.subnet_hidden

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = self.swin.forward_intermediates(x, indices=len(self.swin.feature_info), intermediates_only=True)
        grid = levels[-1].shape[-2:]
        levels = [F.adaptive_avg_pool2d(level, grid) for level in levels[:-1]] + [levels[-1]]
        return {task: branch(levels) for task, branch in self.branches.items()}
