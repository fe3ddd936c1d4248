"""`agescale predict BUNDLE IMAGE_OR_DIR ...`: age, 90 % interval and P(female) per image."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from base.errors import UserError
from base.image_modes import to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


PREPROCESS_KEYS = ("resize", "center_crop", "scale", "mean", "std", "input_name")


def _bundle_json(bundle: Path, name: str, keys: tuple[str, ...]) -> dict:
    """One bundle file, parsed and checked for the keys predict reads: a damaged or hand-edited
    file is one line naming it, not a KeyError mid-batch."""
    path = bundle / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing from the bundle; export it again") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {e})"[:300]) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}; export the bundle again")
    return data


def session_options(threads: int | None = None, spin: bool = True):
    """ONNX Runtime session options. `spin=False` stops the intra-op threads from busy-waiting for
    the next parallel section: a win where the cores are shared (the HTTP service, whose proxy and
    replica event loop need the CPU between model calls), a small loss for back-to-back batches."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class Predictor:
    def __init__(self, bundle: Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        self.pre, self.labels = _bundle_json(bundle, "preprocess.json", PREPROCESS_KEYS), _bundle_json(
            bundle, "labels.json", ("min_age", "max_age"))
        opts = session_options(threads, spin)
        try:
            self.session = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, NoSuchFile, Fail, ...)
            raise UserError(f"{bundle / 'model.onnx'}: not a loadable ONNX model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); export the bundle again") from None
        self.names = [o.name for o in self.session.get_outputs()]
        self.ages = np.arange(self.labels["min_age"], self.labels["max_age"] + 1, dtype=np.float64)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        p = self.pre
        if p.get("exif_orientation"):
            image = ImageOps.exif_transpose(image)
        image = to_rgb(image)  # the sharder's conversion: 16-bit, float, palette, alpha all as in training
        w, h = image.size
        short = p["resize"]["shorter_side"]
        scale = short / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        cw, ch = p["center_crop"]
        left, top = (image.width - cw) // 2, (image.height - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
        x = np.asarray(image, dtype=np.float32) * p["scale"]
        x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
        return x.transpose(2, 0, 1)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {self.pre["input_name"]: batch})))

    def interval(self, age: np.ndarray, dist: np.ndarray | None) -> np.ndarray | None:
        """(N, 2) bounds by the bundle's rule (labels.json "interval"): calibrated prediction
        ± q * max(std, std_floor), or the distribution's central interval."""
        rule = self.labels.get("interval")
        if rule is None:
            return None
        if rule.get("calibrated"):
            std = np.ones(len(age))
            if dist is not None:
                mean = dist @ self.ages
                std = np.sqrt(np.clip((dist * (self.ages[None] - mean[:, None]) ** 2).sum(1), 0, None))
            half = rule["q"] * np.maximum(std, rule["std_floor"])
            lo, hi = self.labels["min_age"], self.labels["max_age"]
            return np.stack([np.clip(age - half, lo, hi), np.clip(age + half, lo, hi)], axis=1)
        level = rule["level"]
        cdf = np.cumsum(dist, axis=1)
        lo = (cdf < (1 - level) / 2).sum(1).clip(max=len(self.ages) - 1)
        hi = (cdf < (1 + level) / 2).sum(1).clip(max=len(self.ages) - 1)
        return np.stack([self.ages[lo], self.ages[hi]], axis=1)

    def predict_arrays(self, batch: np.ndarray) -> list[dict]:
        """Age, 90 % interval and P(female) for preprocessed inputs (N, 3, S, S)."""
        out = self.run(batch)
        intervals = self.interval(out["age"].astype(np.float64), out.get("distribution"))
        results = []
        for i in range(len(batch)):
            r = {"age": round(float(out["age"][i]), 2)}
            if intervals is not None:
                r["interval90"] = [round(float(intervals[i, 0]), 2), round(float(intervals[i, 1]), 2)]
            if "gender_prob" in out:
                r["female_prob"] = round(float(out["gender_prob"][i]), 4)
            results.append(r)
        return results

    def predict(self, paths: list[Path], batch_size: int = 32) -> Iterator[dict]:
        """One result per path, in order; a file that is not an image gives an `error` entry."""
        for start in range(0, len(paths), batch_size):
            chunk, arrays, results = paths[start:start + batch_size], [], {}
            for p in chunk:
                try:
                    with Image.open(p) as im:
                        arrays.append((p, self.preprocess(im)))
                except Exception as e:  # Pillow raises many types for non-images
                    results[p] = {"file": str(p), "error": f"not a readable image ({type(e).__name__}: {e})"}
            if arrays:
                for (p, _), r in zip(arrays, self.predict_arrays(np.stack([a for _, a in arrays]))):
                    results[p] = {"file": str(p), **r}
            yield from (results[p] for p in chunk)


def expand(inputs: list[Path]) -> list[Path]:
    files = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files
