"""`agescale export`: the serving bundle, loadable without this repo's training code.

  model.safetensors   consolidated fp32 weights          model.onnx   dynamic batch dimension
  preprocess.json     how an image becomes the input      labels.json  how outputs become answers
  card.md, card.json  config, data manifest hash, metrics, intended use and limits, data license
  detector/           MTCNN P/R/O-nets as ONNX + settings (faces in ordinary photos; see serving/detect.py)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from base.config import resolved
from serving.align import UTKFACE_CROP, UTKFACE_TEMPLATE
from trainer import calibration
from trainer.export_detector import LICENSE as DETECTOR_LICENSE
from trainer.export_detector import export_detector
from trainer.load import load_trained, run_dir_of
from trainer.metrics import DEFAULT_EDGES
from trainer.models import Ensemble
from trainer.models.ensemble import ZOOM
from trainer.report import fit_rule

INTERVAL = 0.9
TTA_TEXT = {"hflip": "the image and its mirror",
            "hflip_zoom": f"the image, a {ZOOM:g} centre zoom of it, and the mirrors of both"}
LICENSE = ("Trained on UTKFace (non-commercial research only; the images' copyright belongs to their owners). "
           "The weights inherit that restriction: no commercial use.")


class ServingModel(nn.Module):
    """The model with its decoding rule (and test-time augmentation, when on) folded in:
    image → age, distribution (if any), P(female)."""

    def __init__(self, model, tta: str = "none"):
        super().__init__()
        self.predictor = Ensemble.for_tta([model], tta)

    def forward(self, image: torch.Tensor):
        res = self.predictor(image)
        return tuple(res[k] for k in ("age", "distribution", "gender_prob") if k in res)


def output_names(model) -> list[str]:
    names = ["age"]
    if model.method.distribution(torch.zeros(1, model.method.out_features)) is not None:
        names.append("distribution")
    if model.gender is not None:
        names.append("gender_prob")
    return names


def write_onnx(model, image_size: int, path: Path, tta: str = "none") -> list[str]:
    """The model with its decoding rule (and TTA) as ONNX (dynamic batch); returns the output names."""
    serving, names = ServingModel(model, tta).eval(), output_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(serving, (torch.randn(2, 3, image_size, image_size),), str(path),
                          input_names=["image"], output_names=names, dynamo=True, opset_version=18,
                          external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return names


def _interval_rule(rule: dict | None, has_distribution: bool) -> dict | None:
    """How predict reads the 90 % interval: the run's conformal calibration when it has one,
    else the distribution's central interval (uncalibrated), else none."""
    if rule is not None:
        return {"level": rule["level"], "calibrated": True, "method": rule["method"], "q": rule["q"],
                "std_floor": rule["std_floor"], "fitted_on": rule.get("split", "val"), "n": rule["n"],
                "rule": rule["rule"]}
    if not has_distribution:
        return None
    return {"level": INTERVAL, "calibrated": False, "rule": "central interval of `distribution`: the first ages at "
            "which the cumulative probability reaches (1-level)/2 and (1+level)/2 (not calibrated: the run has "
            "no calibration.json for these weights and this TTA; `agescale export --calibrate-on SHARDS/val` "
            "fits one)"}


def export_bundle(path: Path, out: Path, tta: str | None = None, detector: bool = True,
                  calibrate_on: Path | None = None) -> dict:
    """`calibrate_on` (SHARDS/<split>): fit the 90 % interval there for this TTA, instead of using
    the run's calibration.json (which applies only to the TTA it was fitted with)."""
    cfg, model, weights = load_trained(path)
    run = run_dir_of(path)
    tta = cfg.model.tta if tta is None else tta
    if calibrate_on is not None:
        rule = fit_rule([model], cfg, calibrate_on, tta)
    else:
        rule = calibration.applies(calibration.load(run), weights, run, tta, cfg.model.decode)
    out.mkdir(parents=True, exist_ok=True)
    lc, size = cfg.data.loader, cfg.data.loader.image_size
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    names = write_onnx(model, size, out / "model.onnx", tta=tta)
    (out / "preprocess.json").write_text(json.dumps({
        "input_name": "image", "input_size": size, "layout": "NCHW", "dtype": "float32", "channel_order": "RGB",
        "exif_orientation": True,
        "resize": {"shorter_side": round(size / lc.eval_crop_pct), "interpolation": "bilinear", "antialias": True},
        "center_crop": [size, size], "scale": 1 / 255, "mean": list(lc.mean), "std": list(lc.std),
        "tta": {"mode": tta, "where": f"inside model.onnx (one pass of the graph averages {TTA_TEXT[tta]})"
                if tta != "none" else "none"},
        # Photos: detect (detector/), then warp each face so its 5 landmarks land on this template in a
        # crop_size x crop_size image, then the resize and crop above (serving/photo.py).
        "align": {"landmarks": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
                  "template": UTKFACE_TEMPLATE, "crop_size": UTKFACE_CROP, "min_detection_score": 0.9,
                  "template_from": "mean MTCNN landmarks inside 999 UTKFace training crops (serving/align.py)"}
        if detector else None,
    }, indent=1) + "\n")
    if detector:
        export_detector(out / "detector")
    m = model.method
    (out / "labels.json").write_text(json.dumps({
        "method": cfg.model.method, "min_age": m.min_age, "max_age": m.max_age,
        "decode": cfg.model.decode,
        "outputs": {"age": f"predicted age in years (N,): the {cfg.model.decode} of the age distribution"
                    + (f", averaged over {TTA_TEXT[tta]}" if tta != "none" else "")
                    if "distribution" in names else "predicted age in years (N,)",
                    "distribution": "probabilities over the integer ages min_age..max_age (N, K)",
                    "gender_prob": "probability that the face is female (N,); 0 = male, 1 = female"},
        "output_names": names,
        "interval": _interval_rule(rule, "distribution" in names),
        "age_group_edges": list(DEFAULT_EDGES),
    }, indent=1) + "\n")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    best = json.loads((run / "best" / "metrics.json").read_text()) if (run / "best" / "metrics.json").exists() else {}
    run_info = json.loads((run / "run.json").read_text())
    card = {"model": {"architecture": cfg.model.architecture, "model_args": cfg.model.family_args().model_dump(),
                      "backbone": cfg.model.backbone, "method": cfg.model.method, "input_size": size,
                      "weights_from": str(weights),
                      # the ONNX graph has one input: MiVOLO's body crop, when the model has that path,
                      # is the zero image inside it (face-only serving, as UTKFace-style crops are)
                      "inputs": ["image"]},
            "training_config": resolved(cfg), "data_manifest_sha256": run_info.get("data_manifest_sha256"),
            "metrics": {"validation_best": best, "test": summary.get("test")},
            "intended_use": "Research on apparent/real age and gender estimation from aligned, cropped face "
                            "images like UTKFace's (200x200, dlib-aligned).",
            "limits": ["Expects faces framed like the training data: `predict` detects and aligns faces in photos "
                       "(MTCNN, template in preprocess.json); `--no-detect` takes pre-aligned crops as they are.",
                       "UTKFace labels are estimated (DEX + human check): several years of label noise.",
                       "Per-group errors differ (see metrics by race and gender); do not use for decisions "
                       "about individuals.", "Gender is a binary label in the training data."],
            "license": LICENSE, "detector_license": DETECTOR_LICENSE if detector else None}
    (out / "card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    test = summary.get("test") or {}
    (out / "card.md").write_text("\n".join([
        f"# agescale model card: {cfg.model.architecture} {cfg.model.backbone} / {cfg.model.method}", "",
        f"- Input: {size}x{size} RGB face crop; preprocessing in `preprocess.json`; outputs in `labels.json`.",
        f"- Data manifest sha256: `{card['data_manifest_sha256']}`",
        f"- Best validation MAE: {best.get('mae', float('nan')):.2f} (step {best.get('step')})",
        f"- Test MAE: {test.get('mae', float('nan')):.2f}, CS@5: {test.get('cs@5', float('nan')):.3f}, "
        f"gender accuracy: {test.get('gender_accuracy', float('nan')):.3f}", "",
        "## Intended use", card["intended_use"], "", "## Limits", *[f"- {x}" for x in card["limits"]], "",
        "## License", LICENSE, *([DETECTOR_LICENSE] if detector else []), ""]))
    return card
