"""The one image-mode conversion every path from an image file to model input uses: the
sharder and the loaders (data_pipeline) and predict (serving, which may not import the
training stack), so it lives in the base layer."""

from __future__ import annotations

import numpy as np
from PIL import Image

from base.errors import UserError

# Transparent pixels are composited onto this fixed background (white), not dropped to black.
BACKGROUND = (255, 255, 255)
# Integer and float modes beyond 8 bits: stretched from their own min..max to 0..255. A constant
# image (min == max) becomes 0, black. NaN counts as the minimum, +-inf as the max / min.
HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
PLAIN_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def to_rgb(im: Image.Image, where: str | None = None) -> Image.Image:
    """`im` as 8-bit RGB, correct for every mode Pillow opens.

    Why not `im.convert("RGB")`: Pillow clips 16/32-bit and float values at 255 (a 16-bit PNG
    becomes a white square) and drops transparency to whatever colour hides under it. Other
    modes are refused with UserError naming `where` (default: the image's file name) and the mode.
    """
    mode = im.mode
    if mode in HIGH_DEPTH_MODES:
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(np.round((a - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if mode in ALPHA_MODES or (mode in PLAIN_MODES and "transparency" in im.info):
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # Pillow has no La → RGBA
        return Image.alpha_composite(Image.new("RGBA", im.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    if mode in PLAIN_MODES:
        return im.convert("RGB")
    name = where or getattr(im, "filename", "") or "image"
    raise UserError(f"{name}: image mode {mode!r} is not supported (known: "
                    f"{', '.join(sorted(PLAIN_MODES | ALPHA_MODES | HIGH_DEPTH_MODES))})")
