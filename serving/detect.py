"""Face detection with 5 landmarks: MTCNN's P/R/O-net cascade on ONNX Runtime + NumPy.

The three networks' weights are facenet-pytorch's (MIT; ported from Zhang et al.'s MTCNN), turned
into ONNX once by `agescale export` (`trainer/export_detector.py`) and stored in the bundle's
`detector/`. The cascade around them (image pyramid, box regression, non-maximum suppression) is
written here in NumPy because the library's version is torch code, and serving must not import
torch (`predict` keeps its ONNX Runtime + NumPy + Pillow footprint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from base.errors import UserError

NETS = ("pnet", "rnet", "onet")
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Face:
    box: np.ndarray        # x1, y1, x2, y2 in photo pixels
    score: float           # O-net's face probability
    landmarks: np.ndarray  # (5, 2) x, y in the order of LANDMARKS (left/right as seen in the photo)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; `min` divides the overlap by the smaller box (MTCNN's last stage)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.argsort(scores)[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.array(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square around its centre (the next net's input is square)."""
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w / 2 - side / 2
    b[:, 1] += h / 2 - side / 2
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    b[:, :4] += reg * np.stack([w, h, w, h], axis=1)
    return b


def _normalise(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) - 127.5) * 0.0078125).transpose(0, 3, 1, 2)


class FaceDetector:
    """`detect(image)` → faces with box, score and landmarks, largest first."""

    def __init__(self, folder: Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        from serving.predict import session_options

        try:
            self.settings = json.loads((folder / "detector.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{folder / 'detector.json'}: missing or not JSON ({type(e).__name__}); export the "
                            "bundle again") from None
        opts = session_options(threads, spin)
        self.nets = {}
        for name in NETS:
            try:
                self.nets[name] = ort.InferenceSession(str(folder / f"{name}.onnx"), opts,
                                                       providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types for a missing or damaged file
                raise UserError(f"{folder / (name + '.onnx')}: not a loadable ONNX model ({type(e).__name__}); "
                                "export the bundle again") from None

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        sess = self.nets[name]
        return sess.run(None, {sess.get_inputs()[0].name: x})

    def _crops(self, photo: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
        """Square boxes cut from the photo (zero outside it), resized with area averaging. MTCNN's
        box coordinates are 1-based, so pixel columns x1-1 .. x2-1 (as the reference cuts them)."""
        h, w = photo.shape[:2]
        out = np.zeros((len(boxes), size, size, 3), np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(np.trunc(boxes[:, :4]).astype(np.int64) - 1):
            bw, bh = x2 - x1 + 1, y2 - y1 + 1
            if bw < 1 or bh < 1:
                continue
            tile = np.zeros((bh, bw, 3), np.uint8)
            sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2 + 1, w), min(y2 + 1, h)
            if sx2 > sx1 and sy2 > sy1:
                tile[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = photo[sy1:sy2, sx1:sx2]
            out[k] = np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BOX))
        return out

    def detect(self, image: Image.Image) -> list[Face]:
        s = self.settings
        image = image if image.mode == "RGB" else image.convert("RGB")
        photo = np.asarray(image)
        h, w = photo.shape[:2]
        # Stage 1: P-net slides over a pyramid whose first level maps min_face pixels to its 12-px window.
        scale, scales = 12.0 / s["min_face_size"], []
        while min(h, w) * scale >= 12:
            scales.append(scale)
            scale *= s["factor"]
        found = []
        for scale in scales:
            sh, sw = int(h * scale + 1), int(w * scale + 1)
            level = np.asarray(image.resize((sw, sh), Image.Resampling.BOX))[None]
            reg, prob = self._run("pnet", _normalise(level))
            prob = prob[0, 1]
            ys, xs = np.nonzero(prob >= s["thresholds"][0])
            if not len(ys):
                continue
            q1 = np.floor((2 * np.stack([xs, ys], 1) + 1) / scale)
            q2 = np.floor((2 * np.stack([xs, ys], 1) + 12) / scale)
            cand = np.concatenate([q1, q2, prob[ys, xs, None], reg[0][:, ys, xs].T], axis=1)
            found.append(cand[_nms(cand[:, :4], cand[:, 4], 0.5)])
        if not found:
            return []
        boxes = np.concatenate(found)
        boxes = boxes[_nms(boxes[:, :4], boxes[:, 4], 0.7)]
        w_, h_ = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.concatenate([boxes[:, :4] + boxes[:, 5:9] * np.stack([w_, h_, w_, h_], 1), boxes[:, 4:5]], 1)
        boxes = _square(boxes)
        # Stage 2: R-net rejects and refines at 24 px.
        reg, prob = self._run("rnet", _normalise(self._crops(photo, boxes, 24)))
        keep = prob[:, 1] > s["thresholds"][1]
        boxes, reg = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1), reg[keep]
        if not len(boxes):
            return []
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7)
        boxes = _square(_regress(boxes[pick], reg[pick]))
        # Stage 3: O-net gives the final score, box and the five landmarks at 48 px.
        reg, points, prob = self._run("onet", _normalise(self._crops(photo, boxes, 48)))
        keep = prob[:, 1] > s["thresholds"][2]
        boxes, reg, points = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1), reg[keep], points[keep]
        if not len(boxes):
            return []
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        marks = np.stack([bw[:, None] * points[:, :5] + boxes[:, :1] - 1,
                          bh[:, None] * points[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = _regress(boxes, reg)
        pick = _nms(boxes[:, :4], boxes[:, 4], 0.7, mode="min")
        faces = [Face(box=boxes[i, :4], score=float(boxes[i, 4]), landmarks=marks[i]) for i in pick]
        return sorted(faces, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
