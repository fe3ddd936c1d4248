"""Typed config of the model and its multi-task loss (the `model:` section of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from base.config import Strict

BACKBONES = ("resnet18", "resnet34", "resnet50", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")


class ModelConfig(Strict):
    backbone: str = Field("resnet18", description=f"a timm model name, e.g. {', '.join(BACKBONES)}")
    weights: str = Field("scratch", description="'scratch', a local .pth/.safetensors file, or 'hub' (downloads)")
    method: str = Field("dex", description="age method (see `agescale methods`)")
    method_args: dict[str, float] = Field(default_factory=dict,
                                          description="the method's options, e.g. {sigma: 3} for ldl, "
                                          "{label_smoothing: 0.1} for dex")
    tta: Literal["none", "hflip"] = Field("none", description="test-time augmentation in evaluate, export and "
                                          "predict: hflip averages the image and its mirror")
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

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from trainer.methods import list_methods  # the registry (imports torch, so only when validating)

        known = [m.name for m in list_methods()]
        if v not in known:
            raise ValueError(f"unknown age method; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.max_age <= self.min_age:
            raise ValueError(f"max_age {self.max_age} must exceed min_age {self.min_age}")
        if self.gender_conditioned_age and not self.gender_head:
            raise ValueError("gender_conditioned_age needs gender_head: true")
        from trainer.methods import create_method

        try:
            create_method(self.method, min_age=self.min_age, max_age=self.max_age, **self.method_args)
        except Exception as e:  # UserError from the method: name it here, at load time
            raise ValueError(str(e)) from None
        return self


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")


class TrainConfig(Strict):
    run_dir: str = "runs/train"
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    device: Literal["cpu", "gpu"] = Field("cpu", description="cpu: gloo, fp32; gpu: nccl")
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    val_every_steps: int | None = Field(None, ge=1, description="also validate every N steps (default: per epoch)")
    ckpt_every_steps: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every_steps: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    deterministic: bool = Field(True, description="deterministic torch algorithms (exact resume on CPU)")
    test_at_end: bool = Field(True, description="evaluate the best checkpoint on the test split at the end")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON merged over the generated one")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="exponential moving average of the weights "
                                    "(timm ModelEmaV3, warm-up on); validation, best/ and export use it; null = off")
    ema_val_raw: bool = Field(False, description="with EMA: also validate the raw weights (logged as val_raw; "
                              "an EMA A/B inside one run)")
    channels_last: bool = Field(False, description="NHWC memory format for the model and its inputs")
    compile: bool = Field(False, description="torch.compile (inductor) the trained model (its training steps and, "
                          "without EMA, its validation); falls back to eager, with the reason logged, where it "
                          "cannot compile")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = torch's default")
    max_nonfinite_steps: int = Field(20, ge=1, description="stop with an error after this many consecutive "
                                     "micro-batches whose loss is inf or nan (they are skipped, not applied)")
    calibrate: bool = Field(True, description="after training, fit the 90 % interval on the validation split "
                            "(split conformal); evaluate, export and predict use it")
