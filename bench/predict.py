"""`agescale bench predict BUNDLE`: serving throughput of ONNX Runtime against torch eager on
the CPU, at batch 1 and 32, in one run, on the same preprocessed real images.
`ratio` = ONNX Runtime / torch images/s at batch 1, `target` = 1.5. Both use all cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from base.errors import UserError
from bench.common import items_per_s, machine
from serving.predict import Predictor, expand
from trainer.export import ServingModel
from trainer.models import create_model


def run(bundle: Path, images: Path) -> dict:
    import json

    from safetensors.torch import load_file

    from trainer.run_config import Config

    if not (bundle / "model.onnx").exists():
        raise UserError(f"{bundle}: no model.onnx")
    files = expand([images])[:32]
    if len(files) < 32:
        raise UserError(f"{images}: need at least 32 images")
    pred = Predictor(bundle)
    from PIL import Image
    batch = np.stack([pred.preprocess(Image.open(f)) for f in files])
    card = json.loads((bundle / "card.json").read_text())
    cfg = Config.model_validate(card["training_config"])
    cfg.model.weights = "scratch"
    model = create_model(cfg.model, cfg.data.loader.image_size).eval()
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    # the same TTA as the bundle's graph (preprocess.json; `export --tta` may differ from the run's)
    eager = ServingModel(model, pred.pre.get("tta", {}).get("mode", "none")).eval()

    def torch_run(x):
        with torch.inference_mode():
            eager(torch.from_numpy(x))

    rows = {}
    for b in (1, 32):
        rows[b] = {"onnxruntime_img_s": round(items_per_s(pred.run, batch[:b]), 1),
                   "torch_eager_img_s": round(items_per_s(torch_run, batch[:b]), 1)}
    ratio = rows[1]["onnxruntime_img_s"] / rows[1]["torch_eager_img_s"]
    return {"benchmark": "predict", "bundle": str(bundle), "batch_1": rows[1], "batch_32": rows[32],
            "ratio": round(ratio, 3), "target": 1.5, "meets_target": ratio >= 1.5, "threads": torch.get_num_threads(),
            "machine": machine()}
