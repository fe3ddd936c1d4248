"""Test photos made from aligned face crops, and how well detection + alignment recovers them.

`make_photos` pastes 1-4 crops at random positions and sizes onto larger textured backgrounds (no
overlaps) and records where each went; `score_photos` runs a PhotoPredictor over them and reports
detection recall/precision at IoU >= 0.5 (against the pasted crop's square) and, per recovered face,
|age from the detected-and-aligned face - age from the crop itself|.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A smooth colour field with blotches and noise: texture, but nothing face-like."""
    nrng = np.random.default_rng(rng.randrange(2**31))
    small = nrng.uniform(0, 255, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
    base = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = nrng.normal(0, 12, (h, w, 3))
    arr = np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_photos(crops: list[Path], n_photos: int, out: Path, seed: int = 0, sizes=(90, 260)) -> list[dict]:
    """Writes out/photo-NNNN.jpg and out/photos.json; returns its entries
    ({file, faces: [{source, box}]})."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    pool, entries = list(crops), []
    for i in range(n_photos):
        w, h = rng.choice([(640, 480), (800, 600), (1024, 768), (600, 800)])
        photo, placed = _background(rng, w, h), []
        for _ in range(rng.randint(1, 4)):
            for _attempt in range(30):
                size = rng.randint(*sizes)
                x, y = rng.randint(0, w - size), rng.randint(0, h - size)
                box = (x, y, x + size, y + size)
                if all(_iou(box, p["box"]) == 0 and not _touch(box, p["box"]) for p in placed):
                    src = pool[rng.randrange(len(pool))]
                    with Image.open(src) as im:
                        photo.paste(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), (x, y))
                    placed.append({"source": str(src), "box": list(box)})
                    break
        path = out / f"photo-{i:04d}.jpg"
        photo.save(path, quality=92)
        entries.append({"file": str(path), "faces": placed})
    (out / "photos.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def _touch(a, b, gap: int = 10) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def score_photos(predictor, entries: list[dict]) -> dict:
    """Recall and precision of detection at IoU >= 0.5, and |Δage| between each recovered face and
    the same crop predicted directly (the `--no-detect` path)."""
    truth, found, matched, false_pos, deltas = 0, 0, 0, 0, []
    crop_age = {}
    for e in entries:
        with Image.open(e["file"]) as im:
            result = predictor.predict_photo(im)
        faces = result["faces"]
        truth, found = truth + len(e["faces"]), found + len(faces)
        used = set()
        for t in e["faces"]:
            best = max(range(len(faces)), key=lambda k: _iou(t["box"], faces[k]["box"]), default=None)
            if best is None or best in used or _iou(t["box"], faces[best]["box"]) < 0.5:
                continue
            used.add(best)
            matched += 1
            if t["source"] not in crop_age:
                with Image.open(t["source"]) as im:
                    crop_age[t["source"]] = predictor.model.predict_arrays(predictor.model.preprocess(im)[None])[0]["age"]
            deltas.append(abs(faces[best]["age"] - crop_age[t["source"]]))
        false_pos += len(faces) - len(used)
    return {"photos": len(entries), "faces": truth, "detected": found, "matched": matched,
            "recall": matched / max(truth, 1), "precision": matched / max(found, 1), "false_positives": false_pos,
            **_delta_stats(deltas)}


def _delta_stats(deltas: list[float]) -> dict:
    """Mean, median and 90th percentile of |Δage|; None when nothing was matched (never a perfect 0)."""
    if not deltas:
        return {"age_abs_delta_mean": None, "age_abs_delta_median": None, "age_abs_delta_p90": None}
    d = np.array(deltas)
    return {"age_abs_delta_mean": float(d.mean()), "age_abs_delta_median": float(np.median(d)),
            "age_abs_delta_p90": float(np.quantile(d, 0.9))}


def padded_crop_agreement(predictor, crops: list[Path]) -> dict:
    """Each crop padded onto a grey canvas twice its size, detected and aligned, against the crop
    predicted as it is: how often a face is found, and |Δage| over the crops where it is."""
    from serving.align import pad_onto_canvas

    deltas, missed = [], 0
    for path in crops:
        with Image.open(path) as im:
            crop = im.convert("RGB")
        own = predictor.model.predict_arrays(predictor.model.preprocess(crop)[None])[0]["age"]
        faces = predictor.predict_photo(pad_onto_canvas(crop)[0])["faces"]
        if not faces:
            missed += 1
            continue
        deltas.append(abs(faces[0]["age"] - own))
    return {"crops": len(crops), "found": len(deltas), "missed": missed, **_delta_stats(deltas)}


def run_bench(bundle: Path, images: Path, n_photos: int = 200, n_crops: int = 500, seed: int = 0) -> dict:
    """`agescale bench detect`: detection recall and age agreement on composited photos, and age
    agreement on padded crops, for a bundle; the crops are taken from `images` in a seeded order."""
    import tempfile
    import time

    from bench.common import machine
    from serving.photo import PhotoPredictor

    from base.errors import UserError

    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(files)
    if len(files) < n_crops + 50:
        raise UserError(f"{images}: {len(files)} images; --crops {n_crops} needs at least {n_crops + 50} "
                        "(the crops, plus 50 or more to composite photos from)")
    pool, crops_for_padding = files[:-n_crops][:1000], files[-n_crops:]
    predictor = PhotoPredictor(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        entries = make_photos(pool, n_photos, Path(tmp), seed=seed)
        t = time.perf_counter()
        photos = score_photos(predictor, entries)
        photos["seconds_per_photo"] = round((time.perf_counter() - t) / max(n_photos, 1), 4)
    crops = padded_crop_agreement(predictor, crops_for_padding)
    return {"benchmark": "detect", "bundle": str(bundle), "images": str(images), "composited_photos": photos,
            "padded_crops": crops, "recall_target": 0.95, "machine": machine()}
