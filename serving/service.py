"""The HTTP service (`agescale serve BUNDLE`): a Ray Serve deployment with a FastAPI ingress.

    POST /predict     multipart field `file` (or a raw image body): the JSON of `predict --json`
                      (?detect=false: the upload is one aligned face crop); ?annotate=true adds the
                      photo with boxes drawn, as a data: URL
    GET  /healthz     the process answers          GET /readyz   the model is loaded
    GET  /metadata    the bundle's card            GET /stats    requests, model calls, faces, refusals
    GET  /            an upload page (plain HTML + JS)

Detection and alignment run per request (in a thread, so uploads overlap); the age model runs in
`@serve.batch` calls that gather the faces of every request waiting within `batch_wait_ms`, up to
`max_batch_size` requests, into one ONNX Runtime call. Refusals are 4xx with a one-line `detail`:
413 upload or image too large, 400 not an image, 408 over the request time limit. Nothing a client
sends can make a replica raise.
"""

# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import asyncio
import base64
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from ray import serve

PAGE = Path(__file__).with_name("page.html")
FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]  # what a photo upload may be; the rest is a 400
MAX_ASPECT = 8  # a 40000x1 "photo" would be resized to gigabytes; no face is that shape


@dataclass
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    max_batch_size: int = 32
    batch_wait_ms: float = 10.0
    threads: int | None = None  # ONNX Runtime intra-op threads per replica
    spin: bool = True           # ONNX Runtime threads busy-wait between calls (see serving.predict.session_options)
    prepare_slots: int = 2      # requests decoded and detected at once per replica (bounds memory)


def _refuse(status: int, detail: str):
    raise HTTPException(status_code=status, detail=detail)


def decode(data: bytes, limits: Limits) -> Image.Image:
    """The upload as an image, or a 4xx naming why not (Pillow's own bomb check included)."""
    if not data:
        _refuse(400, "empty upload: send an image as multipart field 'file' or as the request body")
    if len(data) > limits.max_upload_bytes:
        _refuse(413, f"upload of {len(data)} bytes is over the limit of {limits.max_upload_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
            w, h = probe.size
        if w * h > limits.max_pixels:
            _refuse(413, f"image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels}")
        if max(w, h) > MAX_ASPECT * min(w, h):
            _refuse(400, f"image of {w}x{h} has an aspect ratio over {MAX_ASPECT}:1")
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        image.load()  # decode now: a truncated file fails here, not later
        return image
    except HTTPException:
        raise
    except Exception as e:  # Pillow raises many types (UnidentifiedImageError, OSError, DecompressionBomb...)
        why = "not a format Pillow reads" if isinstance(e, UnidentifiedImageError) else str(e)[:160]
        _refuse(400, f"not a readable image ({type(e).__name__}: {why})")


def build_app(bundle: Path, limits: Limits, replicas: int = 1, cpus_per_replica: float = 1.0):
    """The Ray Serve application for `serve.run`."""
    app = FastAPI(title="agescale", description="Age, 90 % interval and gender for every face in a photo.")

    @serve.deployment(name="agescale", max_ongoing_requests=256, health_check_period_s=5)
    @serve.ingress(app)
    class AgeService:
        def __init__(self):
            from serving.photo import PhotoPredictor
            from serving.predict import Predictor

            self.bundle, self.limits = bundle, limits
            self.crops = Predictor(bundle, threads=limits.threads, spin=limits.spin)
            # a bundle exported without a detector still serves pre-aligned crops; a damaged one fails here
            self.photos = PhotoPredictor(bundle, threads=limits.threads, spin=limits.spin) if self.crops.pre.get("align") else None
            self.slots = asyncio.Semaphore(limits.prepare_slots)
            card = bundle / "card.json"
            self.card = json.loads(card.read_text()) if card.exists() else {}
            self.stats = {"requests": 0, "model_calls": 0, "faces": 0, "refused": 0, "max_batch": 0}
            self._infer.set_max_batch_size(limits.max_batch_size)
            self._infer.set_batch_wait_timeout_s(limits.batch_wait_ms / 1000)
            self.ready = True

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def _infer(self, inputs: list[np.ndarray]) -> list[list[dict]]:
            """One ONNX Runtime call for the faces of every request in the batch."""
            counts = [len(x) for x in inputs]
            self.stats["model_calls"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], len(inputs))
            # in a thread: the ONNX call must not hold the replica's event loop (uploads, timers, /healthz)
            flat = await asyncio.to_thread(self.crops.predict_arrays, np.concatenate(inputs)) if sum(counts) else []
            out, i = [], 0
            for n in counts:
                out.append(flat[i:i + n])
                i += n
            return out

        def _prepare(self, data: bytes, detect: bool):
            image = decode(data, self.limits)
            if detect and self.photos is None:
                _refuse(400, "this bundle has no face detector: send aligned crops with ?detect=false")
            try:
                if detect:
                    photo = self.photos.load(image)
                    faces, inputs = self.photos.locate(photo)
                    return photo, faces, inputs
                return image, None, self.crops.preprocess(image)[None]
            except Exception as e:  # bad EXIF, an unconvertible mode, degenerate landmarks: the upload's fault
                _refuse(400, f"cannot use this image ({type(e).__name__}: {str(e)[:160]})")

        async def _handle(self, data: bytes, detect: bool, with_image: bool) -> dict:
            async with self.slots:
                photo, faces, inputs = await asyncio.to_thread(self._prepare, data, detect)
            preds = await self._infer(inputs) if len(inputs) else []
            self.stats["faces"] += len(preds)
            if not detect:
                return preds[0]
            from serving.photo import annotate

            result = self.photos.merge(photo, faces, preds)
            if with_image:
                buf = io.BytesIO()
                annotate(photo, result["faces"]).save(buf, format="JPEG", quality=88)
                result["annotated_jpeg"] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            return result

        @app.post("/predict")
        async def predict(self, request: Request, detect: bool = True, annotate: bool = False):
            self.stats["requests"] += 1
            start = time.perf_counter()
            try:
                data, name = await _read_upload(request, self.limits)
                try:
                    result = await asyncio.wait_for(self._handle(data, detect, annotate),
                                                    self.limits.request_timeout_s)
                except asyncio.TimeoutError:
                    _refuse(408, f"request took over the limit of {self.limits.request_timeout_s} s")
            except HTTPException as e:
                self.stats["refused"] += 1
                return JSONResponse({"detail": e.detail}, status_code=e.status_code)
            if name:
                result = {"file": name, **result}
            result["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
            return result

        @app.get("/healthz")
        def healthz(self):
            return {"status": "ok"}

        @app.get("/readyz")
        def readyz(self):
            return {"ready": self.ready, "detector": self.photos is not None}

        @app.get("/metadata")
        def metadata(self):
            return {"card": self.card, "limits": asdict(self.limits), "bundle": str(self.bundle)}

        @app.get("/stats")
        def get_stats(self):
            return self.stats

        @app.get("/", response_class=HTMLResponse)
        def page(self):
            return PAGE.read_text()

    return AgeService.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica}).bind()


async def _read_upload(request: Request, limits: Limits) -> tuple:
    """The upload's bytes and file name: multipart field `file`, or the raw body. The body is read
    with its size counted first (chunked requests carry no Content-Length), and a multipart body is
    parsed from that bounded buffer, so no upload reaches the disk or memory past the limit."""
    declared = request.headers.get("content-length")
    slack = 64 * 1024  # multipart headers and boundaries
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes + slack:
        _refuse(413, f"upload of {declared} bytes is over the limit of {limits.max_upload_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_upload_bytes + slack:
            _refuse(413, f"upload is over the limit of {limits.max_upload_bytes} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return bytes(body), None
    sent = [False]

    async def replay():
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=10) as form:
            upload = form.get("file") or form.get("image")
            if upload is None or isinstance(upload, str):
                _refuse(400, "multipart upload has no file field named 'file'")
            return await upload.read(), upload.filename
    except HTTPException:
        raise
    except Exception as e:  # starlette raises its own types for malformed multipart bodies
        _refuse(400, f"bad multipart upload ({type(e).__name__}: {str(e)[:160]})")
