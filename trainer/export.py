"""`agescale export`: the serving bundle, loadable without this repo's training code.

  model.safetensors   consolidated fp32 weights          model.onnx   dynamic batch dimension
  preprocess.json     how an image becomes the input      labels.json  how outputs become answers
  card.md, card.json  config, data manifest hash, metrics, intended use and limits, data license
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from launch.config import resolved
from trainer.load import load_trained, run_dir_of
from trainer.metrics import DEFAULT_EDGES

INTERVAL = 0.9
LICENSE = ("Trained on UTKFace (non-commercial research only; the images' copyright belongs to their owners). "
           "The weights inherit that restriction: no commercial use.")


class ServingModel(nn.Module):
    """The model with its decoding rule folded in: image → age, distribution (if any), P(female)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.method = model, model.method

    def forward(self, image: torch.Tensor):
        out = self.model(image)
        age_out = out["age"].float()
        outputs = [self.method.predict(age_out)]
        dist = self.method.distribution(age_out)
        if dist is not None:
            outputs.append(dist)
        if "gender" in out:
            outputs.append(torch.sigmoid(out["gender"].float()))
        return tuple(outputs)


def output_names(model) -> list[str]:
    names = ["age"]
    if model.method.distribution(torch.zeros(1, model.method.out_features)) is not None:
        names.append("distribution")
    if model.gender is not None:
        names.append("gender_prob")
    return names


def write_onnx(model, image_size: int, path: Path) -> list[str]:
    """The model with its decoding rule as ONNX (dynamic batch); returns the output names."""
    serving, names = ServingModel(model).eval(), output_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(serving, (torch.randn(2, 3, image_size, image_size),), str(path),
                          input_names=["image"], output_names=names, dynamo=True, opset_version=18,
                          external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return names


def export_bundle(path: Path, out: Path) -> dict:
    cfg, model, weights = load_trained(path)
    run = run_dir_of(path)
    out.mkdir(parents=True, exist_ok=True)
    lc, size = cfg.data.loader, cfg.data.loader.image_size
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    names = write_onnx(model, size, out / "model.onnx")
    (out / "preprocess.json").write_text(json.dumps({
        "input_name": "image", "input_size": size, "layout": "NCHW", "dtype": "float32", "channel_order": "RGB",
        "exif_orientation": True,
        "resize": {"shorter_side": round(size / lc.eval_crop_pct), "interpolation": "bilinear", "antialias": True},
        "center_crop": [size, size], "scale": 1 / 255, "mean": list(lc.mean), "std": list(lc.std),
    }, indent=1) + "\n")
    m = model.method
    (out / "labels.json").write_text(json.dumps({
        "method": cfg.model.method, "min_age": m.min_age, "max_age": m.max_age,
        "outputs": {"age": "predicted age in years (N,)",
                    "distribution": "probabilities over the integer ages min_age..max_age (N, K)",
                    "gender_prob": "probability that the face is female (N,); 0 = male, 1 = female"},
        "output_names": names,
        "interval": {"level": INTERVAL, "rule": "central interval of `distribution`: the first ages at which the "
                     "cumulative probability reaches (1-level)/2 and (1+level)/2; absent for methods without a "
                     "distribution"} if "distribution" in names else None,
        "age_group_edges": list(DEFAULT_EDGES),
    }, indent=1) + "\n")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    best = json.loads((run / "best" / "metrics.json").read_text()) if (run / "best" / "metrics.json").exists() else {}
    run_info = json.loads((run / "run.json").read_text())
    card = {"model": {"backbone": cfg.model.backbone, "method": cfg.model.method, "input_size": size,
                      "weights_from": str(weights)},
            "training_config": resolved(cfg), "data_manifest_sha256": run_info.get("data_manifest_sha256"),
            "metrics": {"validation_best": best, "test": summary.get("test")},
            "intended_use": "Research on apparent/real age and gender estimation from aligned, cropped face "
                            "images like UTKFace's (200x200, dlib-aligned).",
            "limits": ["Expects faces framed like the training data; align other photos first.",
                       "UTKFace labels are estimated (DEX + human check): several years of label noise.",
                       "Per-group errors differ (see metrics by race and gender); do not use for decisions "
                       "about individuals.", "Gender is a binary label in the training data."],
            "license": LICENSE}
    (out / "card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    test = summary.get("test") or {}
    (out / "card.md").write_text("\n".join([
        f"# agescale model card: {cfg.model.backbone} / {cfg.model.method}", "",
        f"- Input: {size}x{size} RGB face crop; preprocessing in `preprocess.json`; outputs in `labels.json`.",
        f"- Data manifest sha256: `{card['data_manifest_sha256']}`",
        f"- Best validation MAE: {best.get('mae', float('nan')):.2f} (step {best.get('step')})",
        f"- Test MAE: {test.get('mae', float('nan')):.2f}, CS@5: {test.get('cs@5', float('nan')):.3f}, "
        f"gender accuracy: {test.get('gender_accuracy', float('nan')):.3f}", "",
        "## Intended use", card["intended_use"], "", "## Limits", *[f"- {x}" for x in card["limits"]], "",
        "## License", LICENSE, ""]))
    return card
