"""Face alignment: a similarity transform from the detected 5 landmarks to a fixed template, so a
face in any photo is framed the way the training crops were (UTKFace: dlib-aligned 200x200 crops).

The template is where MTCNN finds the 5 landmarks *inside* the training crops, averaged: measured
by `measure_template` on 1,000 shared UTKFace crops (each padded onto a grey canvas so the detector
sees the whole face), stored in the bundle's `preprocess.json` and re-checked by a test.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# (x, y) in a 200x200 UTKFace crop: left eye, right eye, nose, mouth left, mouth right (as seen in
# the image). Measured with measure_template on 1,000 files of ../shared/data/utkface (the sorted
# list shuffled by random.Random(0), the first 1,000), 2026-12-02: a face was found in 999.
UTKFACE_TEMPLATE = [[59.1, 57.7], [137.2, 57.8], [98.0, 103.4], [62.5, 138.1], [133.3, 138.3]]
UTKFACE_CROP = 200


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that best maps src points to dst in the
    least-squares sense (Umeyama 1991). Written out because it is eight lines and the alternatives
    (OpenCV, scikit-image) would add a large dependency to the torch-free serving path."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
    return np.concatenate([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], axis=1)


def align(photo: Image.Image, landmarks: np.ndarray, template: list, crop: int) -> Image.Image:
    """The crop x crop face whose landmarks land on the template (edges beyond the photo are black)."""
    photo = photo if photo.mode == "RGB" else photo.convert("RGB")
    landmarks = np.asarray(landmarks, np.float64)
    m = similarity(landmarks, template)
    shrink = int(1 / (2 * np.sqrt(abs(np.linalg.det(m[:, :2])))))  # a large face: box-average first, since
    if shrink >= 2:                                                   # a bilinear warp does not antialias
        photo, landmarks = photo.reduce(shrink), landmarks / shrink
        m = similarity(landmarks, template)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2].ravel()  # PIL maps each output pixel back into the photo
    return photo.transform((crop, crop), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR)


def pad_onto_canvas(crop: Image.Image, pad: float = 0.5, fill=(128, 128, 128)) -> tuple[Image.Image, tuple]:
    """The crop in the middle of a grey canvas `pad` x its size larger on each side, and its offset."""
    w, h = crop.size
    dx, dy = int(w * pad), int(h * pad)
    canvas = Image.new("RGB", (w + 2 * dx, h + 2 * dy), fill)
    canvas.paste(crop.convert("RGB"), (dx, dy))
    return canvas, (dx, dy)


def measure_template(detector, crops) -> tuple[np.ndarray, int]:
    """Mean landmark positions (crop coordinates) of the largest face found in each crop, and the
    number of crops where one was found."""
    points = []
    for crop in crops:
        canvas, (dx, dy) = pad_onto_canvas(crop)
        faces = detector.detect(canvas)
        if faces:
            points.append(faces[0].landmarks - np.array([dx, dy]))
    return np.mean(points, axis=0), len(points)
