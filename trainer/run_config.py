"""The run's whole config: `data` (data_pipeline's section), `model` and `train` (the
trainer's), and the rules across sections. Every launcher (CLI, SLURM, Ray Tune, benches)
loads it through `load_config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from base.config import Strict, load
from data_pipeline.config import DataConfig
from trainer.config import ModelConfig, TrainConfig


class Config(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        if self.data.loader.progressive.start_size is not None and self.model.fixed_input_size:
            raise ValueError(f"data.loader.progressive.start_size with model.architecture={self.model.architecture}, "
                             f"model.backbone={self.model.backbone}: built for one input size; progressive resizing "
                             "needs a convolutional backbone")
        return self


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then the overrides, validated together."""
    return load(Config, path, overrides)
