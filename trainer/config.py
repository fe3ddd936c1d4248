"""Typed config of the model and its multi-task loss (the `model:` section of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from base.config import Strict

# The registered age methods' names, here so that loading a config (`agescale shard` too) needs
# no torch; tests/test_methods.py asserts it equals the registry.
METHOD_NAMES = ("coral", "dex", "drf", "gaussian_blend", "l1", "l2", "l2_range", "ldl", "mean_residue",
                "mean_variance", "smooth_l1")
BACKBONES = ("resnet18", "resnet34", "resnet50", "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224")


class TimmArgs(Strict):
    """Any timm backbone (model.backbone) with the multi-task heads."""


class MiVOLOArgs(Strict):
    """MiVOLO (Kuprashevich & Tolstykh, 2023): a VOLO whose patch embedding reads a face and a body crop."""

    body: bool = Field(True, description="build the body stem and the face-body cross-attention; false: face "
                       "stem only (a body crop in the batch is then ignored)")
    fusion_heads: int = Field(4, ge=1, description="heads of the face-body cross-attention")


class SwinFaceArgs(Strict):
    """SwinFace (Qin et al., 2023): a Swin-T for small face crops and one multi-level channel-attention branch
    per task."""

    patch_size: int = Field(2, ge=1, description="Swin's patch size: 2 at 112 px gives SwinFace's 56x56 tokens")
    window_size: int = Field(7, ge=1, description="Swin's attention window (must divide every stage's grid)")
    level_channels: int = Field(128, ge=8, description="output channels of each level's 3x3 conv in a branch")
    gate_reduction: int = Field(16, ge=1, description="reduction of the channel gate's shared MLP")
    subnet_hidden: int = Field(512, ge=8, description="width of the task subnet's two Linear+ReLU+Dropout blocks")
    subnet_dropout: float = Field(0.1, ge=0, lt=1)


# Each family's options: `model.model_args` is parsed into its class (timm's one dict per family).
FAMILY_ARGS: dict[str, type[Strict]] = {"timm": TimmArgs, "mivolo": MiVOLOArgs, "swinface": SwinFaceArgs}
FAMILY_BACKBONE = {"mivolo": ("volo_", "volo_d1_224"), "swinface": ("swin_", "swin_tiny_patch4_window7_224")}


class ModelConfig(Strict):
    architecture: Literal["timm", "mivolo", "swinface"] = Field(
        "timm", description="model family: timm (a timm backbone + heads), mivolo (VOLO with a face+body patch "
        "embedding), swinface (Swin-T + one multi-level channel-attention branch per task)")
    model_args: dict[str, float | int | bool] = Field(default_factory=dict,
                                                      description="the family's options (see its *Args class)")
    backbone: str = Field("resnet18", description=f"a timm model name, e.g. {', '.join(BACKBONES)}")
    weights: str = Field("scratch", description="'scratch', a local .pth/.safetensors file, or 'hub' (downloads)")
    method: str = Field("dex", description="age method (see `agescale methods`)")
    method_args: dict[str, float] = Field(default_factory=dict,
                                          description="the method's options, e.g. {sigma: 3} or {sigma: 1, sigma_per_year: 0.05} for ldl, "
                                          "{label_smoothing: 0.1} for dex")
    decode: Literal["mean", "median"] = Field("mean", description="the reported age of a method with a "
                                              "distribution: its mean, or its median (lower MAE: the median "
                                              "minimises the expected absolute error)")
    tta: Literal["none", "hflip", "hflip_zoom"] = Field(
        "none", description="test-time augmentation in evaluate, export and predict: hflip averages the image "
        "and its mirror; hflip_zoom also a 0.95 centre zoom and its mirror (4 passes)")
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
        if v not in METHOD_NAMES:
            raise ValueError(f"unknown age method; known: {', '.join(METHOD_NAMES)}")
        return v

    @property
    def fixed_input_size(self) -> bool:
        """True for models built for one input size (Swin's windows, VOLO's and ViT's position
        embeddings): progressive resizing and evaluation at another size need a CNN."""
        return self.architecture != "timm" or self.backbone.startswith(("swin", "volo", "vit", "deit"))

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.max_age <= self.min_age:
            raise ValueError(f"max_age {self.max_age} must exceed min_age {self.min_age}")
        if self.gender_conditioned_age and not self.gender_head:
            raise ValueError("gender_conditioned_age needs gender_head: true")
        self.family_args()
        if self.architecture in FAMILY_BACKBONE:
            prefix, example = FAMILY_BACKBONE[self.architecture]
            if not self.backbone.startswith(prefix):
                raise ValueError(f"architecture {self.architecture} needs a {prefix}* backbone (e.g. backbone: "
                                 f"{example}), not {self.backbone!r}")
        if self.attention and self.architecture != "timm":
            raise ValueError(f"attention pooling is for architecture timm; {self.architecture} has its own")
        if self.method_args or self.decode != "mean":
            # the method checks its options and decode (this imports torch, so a config without
            # them, e.g. `agescale shard`'s, skips it; the age range is checked above)
            from trainer.methods import create_method

            try:
                create_method(self.method, min_age=self.min_age, max_age=self.max_age, decode=self.decode,
                              **self.method_args)
            except Exception as e:  # UserError from the method: name it here, at load time
                raise ValueError(str(e)) from None
        return self


    def family_args(self) -> Strict:
        """`model_args` as the family's typed options (a bad key or value names itself)."""
        try:
            return FAMILY_ARGS[self.architecture](**self.model_args)
        except ValueError as e:  # pydantic's ValidationError: one line per bad field
            errs = getattr(e, "errors", lambda: [])()
            what = "; ".join(f"model_args.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs) or str(e)
            raise ValueError(f"architecture {self.architecture}: {what}") from None


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")


class MixupConfig(Strict):
    alpha: float = Field(0.0, ge=0, description="Beta(alpha, alpha) mixing weight; 0 = off (e.g. 0.2)")
    prob: float = Field(1.0, ge=0, le=1, description="share of training batches that are mixed")


class TrainConfig(Strict):
    run_dir: str = "runs/train"
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    time_budget_min: float | None = Field(
        None, gt=0, description="wall-time budget of the whole run (training, validation, calibration, test): at "
        "the first validation with 10 steps timed after the first one (the steps before it are warm-up, never timed), the step count is fitted to the measured step and validation times (never more than "
        "epochs / max_steps give) and saved for resumes; null = epochs / max_steps as set")
    device: Literal["cpu", "gpu"] = Field("cpu", description="cpu: gloo; gpu: nccl")
    precision: Literal["auto", "fp32", "bf16", "bf16_autocast"] = Field(
        "fp32", description="fp32 | bf16 (DeepSpeed's: bf16 weights, fp32 master copy; for GPUs) | bf16_autocast "
        "(fp32 weights and optimizer, convolutions and matmuls in bf16 under torch.autocast: ~1.5x on CPUs with "
        "AVX512-BF16/AMX, 17-26x slower on CPUs without) | auto (bf16 on a GPU with native bf16, bf16_autocast "
        "on a CPU with native bf16, else fp32; run.json records the choice)")
    zero_stage: Literal[0, 1, 2] = 0
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    mixup: MixupConfig = Field(default_factory=MixupConfig)
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
