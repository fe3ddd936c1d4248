"""The MiVOLO family (Kuprashevich & Tolstykh, "MiVOLO: Multi-input Transformer for Age and Gender
Estimation", 2023): a timm VOLO whose patch embedding reads two crops of a person, face and body.

Written here because timm has VOLO but not MiVOLO's two-input embedding. Our reading of the
paper (its public code was read, not copied): each crop gets its own VOLO stem and projection;
the two token maps are fused by cross-attention in both directions (face queries attend to
body keys/values and the reverse); a conv-MLP maps the joined maps back to the backbone's width,
and the VOLO stages run unchanged. A missing crop is a zero (normalised) image.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from trainer.models.backbone import create_backbone


class CrossFusion(nn.Module):
    """(N, D, H, W) face and body token maps → one (N, D, H, W) map."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion_heads {heads} must divide the embedding width {dim}")
        self.norm_face, self.norm_body = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.face_to_body = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.body_to_face = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Conv2d(2 * dim, dim, 1), nn.BatchNorm2d(dim), nn.GELU(), nn.Conv2d(dim, dim, 1))

    def forward(self, face: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        n, d, h, w = face.shape
        f = self.norm_face(face.flatten(2).transpose(1, 2))  # (N, HW, D)
        b = self.norm_body(body.flatten(2).transpose(1, 2))
        f2 = f + self.face_to_body(f, b, b, need_weights=False)[0]
        b2 = b + self.body_to_face(b, f, f, need_weights=False)[0]
        joined = torch.cat([f2, b2], dim=2).transpose(1, 2).reshape(n, 2 * d, h, w)
        return self.mlp(joined)


class DualPatchEmbed(nn.Module):
    """Takes the face and body crops stacked on the channel axis (N, 6, H, W)."""

    def __init__(self, face_embed: nn.Module, heads: int):
        super().__init__()
        self.face = face_embed
        self.body = copy.deepcopy(face_embed)  # same shape, its own weights
        for m in self.body.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.fuse = CrossFusion(face_embed.proj.out_channels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.face(x[:, :3]), self.body(x[:, 3:]))


class MiVOLO(nn.Module):
    """forward(face, body=None) → (N, num_features): the VOLO class token."""

    def __init__(self, name: str, image_size: int, weights: str = "scratch", drop_rate: float = 0.0,
                 body: bool = True, fusion_heads: int = 4):
        super().__init__()
        self.volo = create_backbone(name, image_size, weights, drop_rate)
        self.with_body = body
        if body:
            self.volo.patch_embed = DualPatchEmbed(self.volo.patch_embed, fusion_heads)
        self.num_features = self.volo.num_features

    def forward(self, face: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_body:
            face = torch.cat([face, torch.zeros_like(face) if body is None else body], dim=1)
        return self.volo(face)
