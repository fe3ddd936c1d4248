"""The bundle's face detector: MTCNN's P/R/O-nets from the facenet-pytorch wheel, written as ONNX.

facenet-pytorch (MIT license) ships the three networks' weights inside its wheel
(`facenet_pytorch/data/{p,r,o}net.pt`, ported from Zhang et al.'s MTCNN, also MIT), so nothing is
downloaded. It is installed with --no-deps (its own pins want torch < 2.3); only its model classes
and weight files are used, here at export time. Serving runs the ONNX files (`serving/detect.py`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from base.errors import UserError

LICENSE = ("Face detector: MTCNN (Zhang et al. 2016) P/R/O-net weights as shipped in the facenet-pytorch "
           "2.6.0 wheel (MIT license, (c) Tim Esler), converted to ONNX by agescale export.")
SETTINGS = {"min_face_size": 20, "factor": 0.709, "thresholds": [0.6, 0.7, 0.7]}


def _nets():
    try:
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    except ImportError as e:
        raise UserError(f"the face detector needs facenet-pytorch ({e}); run `make venv`") from None
    return {"pnet": (PNet(), (1, 3, 32, 40), {2: "h", 3: "w"}), "rnet": (RNet(), (2, 3, 24, 24), {}),
            "onet": (ONet(), (2, 3, 48, 48), {})}


def export_detector(out: Path) -> dict:
    """Writes out/{pnet,rnet,onet}.onnx and out/detector.json (settings, landmark order, license)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (net, shape, spatial) in _nets().items():
        net.eval()
        batch = torch.export.Dim("batch", min=1, max=100000)
        dims = {0: batch}
        for axis, label in spatial.items():
            dims[axis] = torch.export.Dim(label, min=12, max=8192)
        outputs = ["reg", "points", "prob"] if name == "onet" else ["reg", "prob"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(*shape),), str(out / f"{name}.onnx"), input_names=["image"],
                              output_names=outputs, dynamo=True, opset_version=18, external_data=False,
                              verbose=False, dynamic_shapes=(dims,))
    info = {**SETTINGS, "landmarks": ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"],
            "input": "RGB uint8 photo; each net takes (x - 127.5) / 128 in NCHW", "license": LICENSE}
    (out / "detector.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
