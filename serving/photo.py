"""Ordinary photos: detect every face, align it the way the training crops were framed, predict.

One result per photo: `{"file", "width", "height", "faces": [{box, landmarks, detection_score, age,
interval90, female_prob}, ...]}`; a photo without a face has `faces: []` and a `note`, and is not an
error. `predict --json` and the HTTP service return exactly this.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from base.errors import UserError
from base.image_modes import to_rgb
from serving.align import align
from serving.detect import FaceDetector
from serving.predict import Predictor

NO_FACE = "no face found"
DETECT_MAX_SIDE = 2000  # detection runs on a copy no larger than this (memory); alignment on the full photo
MAX_FACES = 32          # the largest faces of a crowd photo; the rest are left out (the result's note says so)


class PhotoPredictor:
    def __init__(self, bundle: Path, threads: int | None = None, spin: bool = True):
        self.model = Predictor(bundle, threads=threads, spin=spin)
        spec = self.model.pre.get("align")
        if not spec or not (bundle / "detector").is_dir():
            raise UserError(f"{bundle}: no face detector in the bundle (preprocess.json has no `align`); export "
                            "it again, or pass --no-detect for pre-aligned crops")
        self.template, self.crop = spec["template"], int(spec["crop_size"])
        self.min_score = float(spec.get("min_detection_score", 0.9))
        self.detector = FaceDetector(bundle / "detector", threads=threads, spin=spin)

    def load(self, image: Image.Image) -> Image.Image:
        if self.model.pre.get("exif_orientation"):
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)

    def locate(self, photo: Image.Image) -> tuple[list[dict], np.ndarray]:
        """Faces (box, landmarks, score) and their model inputs, stacked (N, 3, S, S); when the photo
        had more than MAX_FACES, the last face dict carries `more_faces_left_out` (popped by merge)."""
        faces, inputs = [], []
        scale = min(1.0, DETECT_MAX_SIDE / max(photo.size))
        small = photo if scale == 1.0 else photo.resize((max(1, round(photo.width * scale)),
                                                         max(1, round(photo.height * scale))), Image.Resampling.BOX)
        found = [f for f in self.detector.detect(small) if f.score >= self.min_score]
        left_out = max(0, len(found) - MAX_FACES)
        for f in found[:MAX_FACES]:
            f.box, f.landmarks = f.box / scale, f.landmarks / scale
            faces.append({"box": [round(float(v), 1) for v in f.box],
                          "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in f.landmarks],
                          "detection_score": round(f.score, 4)})
            inputs.append(self.model.preprocess(align(photo, f.landmarks, self.template, self.crop)))
        if left_out:
            faces[-1]["more_faces_left_out"] = left_out
        size = self.model.pre["center_crop"]
        return faces, np.stack(inputs) if inputs else np.zeros((0, 3, size[1], size[0]), np.float32)

    @staticmethod
    def merge(photo: Image.Image, faces: list[dict], predictions: list[dict]) -> dict:
        left_out = faces[-1].pop("more_faces_left_out", 0) if faces else 0
        result = {"width": photo.width, "height": photo.height,
                  "faces": [{**f, **p} for f, p in zip(faces, predictions)]}
        if left_out:
            result["note"] = f"only the {MAX_FACES} largest faces are reported ({left_out} more left out)"
        if not faces:
            result["note"] = NO_FACE
        return result

    def predict_photo(self, image: Image.Image) -> dict:
        return self._predict_loaded(self.load(image))

    def _predict_loaded(self, photo: Image.Image) -> dict:
        faces, inputs = self.locate(photo)
        return self.merge(photo, faces, self.model.predict_arrays(inputs) if len(inputs) else [])

    def predict(self, paths: list[Path], annotate_dir: Path | None = None) -> Iterator[dict]:
        """One result per photo, in order; a file that is not an image gives an `error` entry."""
        for i, p in enumerate(paths):
            try:
                with Image.open(p) as im:
                    photo = self.load(im)
            except Exception as e:  # Pillow raises many types for non-images
                yield {"file": str(p), "error": f"not a readable image ({type(e).__name__}: {e})"}
                continue
            result = {"file": str(p), **self._predict_loaded(photo)}
            if annotate_dir is not None:
                out = annotate_dir / f"{i:05d}-{p.stem}.annotated.jpg"  # unique: a/x.jpg and b/x.jpg
                annotate(photo, result["faces"]).save(out, quality=92)
                result["annotated"] = str(out)
            yield result


def annotate(photo: Image.Image, faces: list[dict]) -> Image.Image:
    """The photo with each face's box, landmarks and 'age (interval) F/M' drawn on it."""
    out = photo.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    for f in faces:
        x1, y1, x2, y2 = f["box"]
        draw.rectangle((x1, y1, x2, y2), outline=(0, 220, 90), width=width)
        for x, y in f["landmarks"]:
            draw.ellipse((x - width, y - width, x + width, y + width), fill=(255, 200, 0))
        label = f"{f['age']:.0f}"
        if "interval90" in f:
            label += f" ({f['interval90'][0]:.0f}-{f['interval90'][1]:.0f})"
        if "female_prob" in f:
            label += " F" if f["female_prob"] >= 0.5 else " M"
        box = draw.textbbox((x1, y1), label)
        top = max(0, y1 - (box[3] - box[1]) - 4)
        draw.rectangle((x1, top, x1 + box[2] - box[0] + 4, top + box[3] - box[1] + 4), fill=(0, 220, 90))
        draw.text((x1 + 2, top + 1), label, fill=(0, 0, 0))
    return out
