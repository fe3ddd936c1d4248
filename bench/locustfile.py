"""Locust users for `agescale bench serve` (run by locust in headless mode, one process per run).

Each run writes AGESCALE_LOAD_REPORT (JSON): every request's latency, status codes by upload kind,
and the first and last send times; the bench computes throughput and percentiles from it.
Read from the environment: AGESCALE_LOAD_PATH (e.g. /b/predict?detect=false), AGESCALE_LOAD_FILES
(os.pathsep-separated payloads), AGESCALE_LOAD_REQUESTS (stop after this many requests, all users
together), AGESCALE_LOAD_CORRUPT (share of uploads replaced by corrupt bytes; a 400 for those counts
as success, anything else as failure). Every response that is not 200 (or the expected 400) is a
locust failure, so the CSV's failure count is the number of lost or wrong answers.
"""

import json
import os
import random
import time

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

PATH = os.environ.get("AGESCALE_LOAD_PATH", "/predict")
FILES = [open(p, "rb").read() for p in os.environ.get("AGESCALE_LOAD_FILES", "").split(os.pathsep) if p]
LIMIT = int(os.environ.get("AGESCALE_LOAD_REQUESTS", "0"))
CORRUPT = float(os.environ.get("AGESCALE_LOAD_CORRUPT", "0"))
REPORT = os.environ.get("AGESCALE_LOAD_REPORT")
_sent = [0]
_rng = random.Random(0)
_log = {"latency_ms": [], "status": {"image": {}, "corrupt": {}}, "start": None, "end": None}


def _corrupt(data: bytes) -> bytes:
    """A JPEG cut short and scribbled over: the header parses, the image data does not."""
    cut = bytearray(data[: max(200, len(data) // 3)])
    for i in range(150, len(cut), 7):
        cut[i] = _rng.randrange(256)
    return bytes(cut)


class Client(FastHttpUser):
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one is answered

    @task
    def predict(self):
        if LIMIT and _sent[0] >= LIMIT:
            raise StopUser()
        _sent[0] += 1
        data = _rng.choice(FILES)
        bad = CORRUPT > 0 and _rng.random() < CORRUPT
        body = _corrupt(data) if bad else data
        name = "corrupt" if bad else "image"
        _log["start"] = _log["start"] or time.time()
        t = time.perf_counter()
        with self.client.post(PATH, data=body, headers={"Content-Type": "application/octet-stream"},
                              name=name, catch_response=True) as r:
            _log["latency_ms"].append((time.perf_counter() - t) * 1000)
            _log["end"] = time.time()
            codes = _log["status"][name]
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
            if bad and r.status_code == 400:
                r.success()
            elif not bad and r.status_code == 200:
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}")


def _stop_when_done(environment):
    """Quit once every request was sent and answered (from its own greenlet, as locust advises)."""
    while not (LIMIT and _sent[0] >= LIMIT and environment.runner.user_count == 0):
        gevent.sleep(0.05)
    environment.runner.quit()


@events.init.add_listener
def _watch(environment, **_):
    if LIMIT:
        gevent.spawn(_stop_when_done, environment)


@events.quitting.add_listener
def _write_report(**_):
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(_log, f)
