"""Image decode check and stored payload for the sharder (runs in worker processes).

Every image is decoded once at shard time (a JPEG kept as it is at 1/8 scale, see
`prepare_image`) so that a corrupt or truncated file is caught there, listed in the manifest,
and never reaches a training run. 8-bit RGB or grey JPEG/PNG bytes that pass the check are
stored as they are; anything else (16-bit, float, palette,
transparency, CMYK, other formats, --max-side) is converted by `to_rgb` (launch/image_modes.py,
shared with predict) and re-encoded, so that PIL and DALI decode exactly what `to_rgb` made of
the file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from base.errors import UserError
from base.image_modes import to_rgb

# Stored as they are when already 8-bit RGB or grey: DALI's and PIL's decoders read both the same.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}
KEPT_MODES = {"RGB", "L"}
MIN_SIDE = 8

@dataclass(frozen=True)
class Prepared:
    """Outcome of checking one image: why it is unusable, or what to store."""

    reason: str = ""
    ext: str = ""
    data: bytes = b""  # the original bytes, or new ones when re-encoded
    width: int = 0
    height: int = 0
    sha256: str = ""  # of the input bytes as read (the sharder's de-duplication key), "" if unreadable

    @property
    def ok(self) -> bool:
        return not self.reason


def prepare_image(image: Path | bytes, max_side: int | None = None, quality: int = 95) -> Prepared:
    where = "image bytes" if isinstance(image, bytes) else str(image)
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except OSError as e:
        return Prepared(f"cannot read file: {e.strerror or e}")
    # hashed from the bytes already in memory: one read per file for the decode check and the
    # de-duplication both (a separate hashing pass in the parent cost ~0.2 s per 6,000 files)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            w, h = im.size  # before draft(), which shrinks im.size
            shrink = max_side is not None and max(w, h) > max_side
            if fmt == "JPEG" and im.mode in KEPT_MODES and not shrink:
                # A JPEG stored as it is needs only the check, not its pixels: decoded at 1/8 scale
                # (libjpeg's DCT scaling), every coefficient is still entropy-decoded, so truncated
                # or corrupt data fails exactly as in a full decode (tested on damaged files), at
                # ~0.7x the CPU (`bench shard`: bare_check vs bare_decode img/s). Files that are
                # converted below are decoded in full.
                im.draft(None, (1, 1))
            im.load()  # decode: raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
            if w < MIN_SIDE or h < MIN_SIDE:
                return Prepared(f"image too small: {w}x{h}", sha256=digest)
            # the same test after the decode: a PNG may carry its transparency after the image data
            if fmt in KEPT_FORMATS and im.mode in KEPT_MODES and "transparency" not in im.info and not shrink:
                return Prepared(ext=KEPT_FORMATS[fmt], data=data, width=w, height=h, sha256=digest)
            out = to_rgb(ImageOps.exif_transpose(im), where)
    except UserError as e:
        return Prepared(str(e), sha256=digest)
    except Exception as e:  # PIL raises many types: OSError, SyntaxError, ValueError, DecompressionBombError
        return Prepared(f"undecodable image: {type(e).__name__}: {e}", sha256=digest)
    if shrink:
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    ext = "jpg" if fmt == "JPEG" or shrink else "png"
    out.save(buf, "JPEG", quality=quality) if ext == "jpg" else out.save(buf, "PNG")
    return Prepared(ext=ext, data=buf.getvalue(), width=out.width, height=out.height, sha256=digest)
