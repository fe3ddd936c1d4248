"""The multi-task age model."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.methods import AgeMethod, create_method
from trainer.models.backbone import create_backbone
from trainer.models.mivolo import MiVOLO
from trainer.models.swinface import SwinFace

NUM_RACES = 5


class AttentionPool(nn.Module):
    """Spatial attention over the last feature map: a 1x1 conv scores each position, a softmax
    over positions weights the features. The map is returned for visualisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = fmap.shape
        attn = torch.softmax(self.score(fmap).flatten(1), dim=1)  # (N, HW)
        pooled = torch.einsum("nchw,nhw->nc", fmap, attn.view(n, h, w))
        return pooled, attn.view(n, h, w)


class AgeModel(nn.Module):
    """forward(images, body=None) → {"age": method outputs, "gender": logit (N,), "race": logits
    (N, 5), "attention": (N, h, w) when attention is on}. `body` (a second crop) is read by the
    MiVOLO family only. `self.backbone` is the family's trunk: a timm model, a MiVOLO or a
    SwinFace (whose trunk gives each task its own features)."""

    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        self.cfg = cfg
        self.method: AgeMethod = create_method(cfg.method, min_age=cfg.min_age, max_age=cfg.max_age,
                                                   decode=cfg.decode, **cfg.method_args)
        args = cfg.family_args()
        if cfg.architecture == "mivolo":
            self.backbone = MiVOLO(cfg.backbone, image_size, cfg.weights, cfg.drop_rate, **args.model_dump())
        elif cfg.architecture == "swinface":
            tasks = ["age"] + ["gender"] * cfg.gender_head + ["race"] * cfg.race_head
            self.backbone = SwinFace(cfg.backbone, image_size, tasks, args, cfg.weights, cfg.drop_rate)
        else:
            self.backbone = create_backbone(cfg.backbone, image_size, cfg.weights, cfg.drop_rate)
        features = self.backbone.num_features
        self.attention = AttentionPool(features) if cfg.attention else None
        self.gender = nn.Linear(features, 1) if cfg.gender_head else None
        self.race = nn.Linear(features, NUM_RACES) if cfg.race_head else None
        self.gender_embed = nn.Linear(1, cfg.gender_embedding) if cfg.gender_conditioned_age else None
        self.age = self.method.head(features + (cfg.gender_embedding if cfg.gender_conditioned_age else 0))

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone.forward_features(x)
        if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # Swin
            fmap = fmap.permute(0, 3, 1, 2)
        return fmap

    def forward(self, x: torch.Tensor, body: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.attention is not None:
            feats, out["attention"] = self.attention(self._feature_map(x))
        elif self.cfg.architecture == "mivolo":
            feats = self.backbone(x, body)
        else:
            feats = self.backbone(x)
        task = feats if isinstance(feats, dict) else dict.fromkeys(("age", "gender", "race"), feats)
        age_in = task["age"]
        if self.gender is not None:
            out["gender"] = self.gender(task["gender"]).squeeze(1)
            if self.gender_embed is not None:
                # detached: the age loss should not bend the gender prediction
                p = torch.sigmoid(out["gender"].detach()).unsqueeze(1)
                age_in = torch.cat([age_in, self.gender_embed(p)], dim=1)
        if self.race is not None:
            out["race"] = self.race(task["race"])
        out["age"] = self.age(age_in)
        return out


def create_model(cfg: ModelConfig, image_size: int) -> AgeModel:
    return AgeModel(cfg, image_size)
