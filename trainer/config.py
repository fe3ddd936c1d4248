"""Typed config of the model and its multi-task loss (the `model:` section of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from data_pipeline.config import Strict

BACKBONES = ("resnet18", "resnet34", "resnet50", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")


class ModelConfig(Strict):
    backbone: str = Field("resnet18", description=f"a timm model name, e.g. {', '.join(BACKBONES)}")
    weights: str = Field("scratch", description="'scratch', a local .pth/.safetensors file, or 'hub' (downloads)")
    method: str = Field("dex", description="age method (see `agescale methods`)")
    min_age: int = Field(0, ge=0)
    max_age: int = Field(100, ge=1, le=150)
    drop_rate: float = Field(0.0, ge=0, lt=1)
    attention: bool = Field(False, description="attention pooling over the last feature map (map returned)")
    gender_head: bool = True
    race_head: bool = False
    gender_conditioned_age: bool = Field(False, description="feed the predicted gender into the age head")
    gender_embedding: int = Field(16, ge=1)
    age_weight: float = Field(1.0, ge=0)
    gender_weight: float = Field(1.0, ge=0)
    race_weight: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.max_age <= self.min_age:
            raise ValueError(f"max_age {self.max_age} must exceed min_age {self.min_age}")
        if self.gender_conditioned_age and not self.gender_head:
            raise ValueError("gender_conditioned_age needs gender_head: true")
        return self
