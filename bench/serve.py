"""`agescale bench serve BUNDLE`: the HTTP service under load from locust (headless), on loopback.

One Ray Serve instance runs the bundle twice, as two applications: `/b` with dynamic batching
(`max_batch_size` requests per model call) and `/u` without (one request per call). Locust drives
each at concurrency 1, 8 and 32 with a fixed number of requests per run (closed loop: each user
sends its next request when the last is answered), the two applications interleaved, `rounds` times;
rows are medians. `ratio` = batched ÷ unbatched throughput at concurrency 32; `target` = 1.5.
`model_batch_gain` times the age model alone (ONNX Runtime, batch 1 vs `max_batch_size`) first:
batching saves model time only, so that gain is the most `ratio` can reach on this CPU.
Then a soak: `soak_s` seconds at concurrency 8 on `/b` with 1 % corrupt uploads: 5xx count, failed
(lost or wrong) requests, and the replica's RSS at the start and the end of the soak.

Locust runs on the same 2 cores as the service, so it takes a share of the CPU from it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from base.errors import UserError
from bench.common import items_per_s, machine

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CONCURRENCY = (1, 8, 32)


def _locust(host: str, path: str, files: list[Path], users: int, requests: int | None, seconds: float,
            corrupt: float, workdir: Path) -> dict:
    """One headless locust run; its locustfile logs every request (bench/locustfile.py)."""
    report = workdir / f"run-{time.monotonic_ns()}.json"
    env = {**os.environ, "AGESCALE_LOAD_PATH": path, "AGESCALE_LOAD_FILES": os.pathsep.join(map(str, files)),
           "AGESCALE_LOAD_REQUESTS": str(requests or 0), "AGESCALE_LOAD_CORRUPT": str(corrupt),
           "AGESCALE_LOAD_REPORT": str(report)}
    # all users at once (-r far above -u): the run measures the stated concurrency, not a ramp
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users * 100),
           "-t", f"{int(seconds)}s", "--host", host, "--skip-log", "--loglevel", "ERROR", "--exit-code-on-error", "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if r.returncode != 0 or not report.exists():
        raise UserError(f"locust failed (exit {r.returncode}): {r.stderr.strip()[-400:]}")
    log = json.loads(report.read_text())
    lat = np.array(log["latency_ms"])
    if not len(lat):
        raise UserError(f"locust sent no request to {host}{path}: {r.stderr.strip()[-400:]}")
    ok = log["status"]["image"].get("200", 0) + log["status"]["corrupt"].get("400", 0)
    codes = [(int(c), n) for kind in log["status"].values() for c, n in kind.items()]
    return {"requests": len(lat), "failures": len(lat) - ok,
            "throughput_rps": len(lat) / max(log["end"] - log["start"], 1e-9),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "status": log["status"],
            "corrupt_sent": sum(log["status"]["corrupt"].values()),
            "server_5xx": sum(n for c, n in codes if 500 <= c < 600), "no_response": sum(n for c, n in codes if c == 0)}


def _replica_rss(name: str) -> int:
    """Resident bytes of the Ray Serve replica process(es) of application `name`."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            line = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
            if f"ServeReplica:{name}:" in line:
                total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _payloads(images: Path, kind: str, workdir: Path, count: int = 24) -> list[Path]:
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:200]
    if len(files) < 8:
        raise UserError(f"{images}: need at least 8 face images")
    if kind == "crop":
        return files[:count]
    from bench.photos import make_photos

    return [Path(e["file"]) for e in make_photos(files, count, workdir / "photos", seed=0)]


def _model_batch_gain(bundle: Path, crops: list[Path], batch_size: int, threads: int | None,
                      spin: bool, seconds: float, rounds: int = 2) -> dict:
    """The age model alone in ONNX Runtime, as a replica runs it: images/s at batch 1 and at
    `batch_size`, interleaved rounds, medians. Batching saves model time only, so `gain` bounds
    the service's `ratio` from above, however small the per-request overhead becomes."""
    from PIL import Image

    from serving.predict import Predictor

    pred = Predictor(bundle, threads=threads, spin=spin)
    one = np.stack([pred.preprocess(Image.open(f)) for f in crops])
    full = np.resize(one, (batch_size, *one.shape[1:]))  # the crops repeated up to the batch
    rates: dict = {1: [], batch_size: []}
    for _ in range(rounds):
        for b, x in ((1, one[:1]), (batch_size, full)):
            rates[b].append(items_per_s(pred.predict_arrays, x, seconds))
    at_1, at_n = statistics.median(rates[1]), statistics.median(rates[batch_size])
    return {"batch_1_img_s": round(at_1, 1), f"batch_{batch_size}_img_s": round(at_n, 1),
            "gain": round(at_n / at_1, 3)}


def run(bundle: Path, images: Path, requests: int = 400, rounds: int = 2, soak_s: float = 120.0,
        payload: str = "crop", max_batch_size: int = 32, batch_wait_ms: float = 10.0, port: int = 8765,
        threads: int | None = None, spin: bool = True, model_seconds: float = 3.0) -> dict:
    from cluster.ray_session import start_ray
    from serving.service import Limits, build_app

    if not (bundle / "model.onnx").exists():
        raise UserError(f"{bundle}: no model.onnx (make one with `agescale export RUN --out BUNDLE`)")
    workdir = Path(tempfile.mkdtemp(prefix="agescale-bench-serve-"))
    files = _payloads(images, payload, workdir)
    detect = "true" if payload == "photo" else "false"
    # before Ray starts, on idle cores: the ceiling of `ratio`
    model = _model_batch_gain(bundle, _payloads(images, "crop", workdir), max_batch_size, threads, spin,
                              model_seconds)
    start_ray(None)
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})
    apps = {"batched": ("/b", max_batch_size), "unbatched": ("/u", 1)}
    for name, (prefix, size) in apps.items():
        limits = Limits(max_batch_size=size, batch_wait_ms=batch_wait_ms, threads=threads, spin=spin)
        serve.run(build_app(bundle.resolve(), limits, cpus_per_replica=0.5), name=name, route_prefix=prefix)
    host = f"http://127.0.0.1:{port}"
    try:
        for prefix, _ in apps.values():  # warm-up: first calls load ORT's kernels
            _locust(host, f"{prefix}/predict?detect={detect}", files, 4, 40, 60, 0.0, workdir)
        runs: dict = {name: {c: [] for c in CONCURRENCY} for name in apps}
        for _ in range(rounds):
            for c in CONCURRENCY:
                for name, (prefix, _) in apps.items():
                    runs[name][c].append(_locust(host, f"{prefix}/predict?detect={detect}", files, c,
                                                 requests, 300, 0.0, workdir))
        table = []
        for c in CONCURRENCY:
            for name in apps:
                rs = runs[name][c]
                table.append({"mode": name, "concurrency": c, "requests": sum(r["requests"] for r in rs),
                              **{k: round(statistics.median(r[k] for r in rs), 1)
                                 for k in ("throughput_rps", "p50_ms", "p95_ms", "p99_ms")},
                              "failures": sum(r["failures"] for r in rs),
                              "server_5xx": sum(r["server_5xx"] for r in rs),
                              "no_response": sum(r["no_response"] for r in rs)})
        on = next(r for r in table if r["mode"] == "batched" and r["concurrency"] == 32)["throughput_rps"]
        off = next(r for r in table if r["mode"] == "unbatched" and r["concurrency"] == 32)["throughput_rps"]
        soak = None
        if soak_s > 0:
            rss_start = _replica_rss("batched")
            s = _locust(host, f"/b/predict?detect={detect}", files, 8, None, soak_s, 0.01, workdir)
            rss_end = _replica_rss("batched")
            soak = {"seconds": soak_s, "concurrency": 8, **s, "replica_rss_start_mb": round(rss_start / 2**20, 1),
                    "replica_rss_end_mb": round(rss_end / 2**20, 1),
                    "rss_growth": round(rss_end / rss_start - 1, 4) if rss_start else None}
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return {"benchmark": "serve", "bundle": str(bundle), "payload": payload, "detect": detect == "true",
            "requests_per_run": requests, "rounds": rounds, "max_batch_size": max_batch_size,
            "batch_wait_ms": batch_wait_ms, "threads": threads, "spin": spin,
            "rows": table, "soak": soak, "model_batch_gain": model,
            "ratio": round(on / off, 3), "target": 1.5, "machine": machine(),
            "note": "locust (headless, FastHttpUser, closed loop) on the same cores as the service, loopback only"}
