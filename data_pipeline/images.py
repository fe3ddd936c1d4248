"""Image decode check and stored payload for the sharder (runs in worker processes).

Every image is fully decoded once at shard time so that a corrupt or truncated file is caught
there, listed in the manifest, and never reaches a training run. The bytes that were checked
are the bytes that get stored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

# Stored as they are: DALI's and PIL's decoders read both. Other formats are re-encoded as PNG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
MIN_SIDE = 8


@dataclass(frozen=True)
class Prepared:
    """Outcome of checking one image: why it is unusable, or what to store."""

    reason: str = ""
    ext: str = ""
    data: bytes = b""  # the original bytes, or new ones when re-encoded
    width: int = 0
    height: int = 0

    @property
    def ok(self) -> bool:
        return not self.reason


def prepare_image(image: Path | bytes, max_side: int | None = None, quality: int = 95) -> Prepared:
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except OSError as e:
        return Prepared(f"cannot read file: {e.strerror or e}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            im.load()  # full decode: raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
            w, h = im.size
            if w < MIN_SIDE or h < MIN_SIDE:
                return Prepared(f"image too small: {w}x{h}")
            shrink = max_side is not None and max(w, h) > max_side
            if fmt in KEPT_FORMATS and not shrink:
                return Prepared(ext=KEPT_FORMATS[fmt], data=data, width=w, height=h)
            out = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ValueError, DecompressionBombError
        return Prepared(f"undecodable image: {type(e).__name__}: {e}")
    if shrink:
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    ext = "jpg" if fmt == "JPEG" or shrink else "png"
    out.save(buf, "JPEG", quality=quality) if ext == "jpg" else out.save(buf, "PNG")
    return Prepared(ext=ext, data=buf.getvalue(), width=out.width, height=out.height)

