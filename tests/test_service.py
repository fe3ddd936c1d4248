"""`agescale serve`: a real Ray Serve instance on loopback, its JSON, its refusals and its batching;
the upload page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from bench.photos import make_photos
from conftest import AGESCALE, REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, parsed JSON or text) for a GET, or a POST when data is given."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _multipart(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = "agescale-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def service(bundle, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen([AGESCALE, "serve", str(bundle), "--port", str(port), "--max-upload-mb", "1",
                             "--max-pixels", "2000000", "--batch-wait-ms", "50"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if _call(url + "/readyz", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the service did not become ready in 180 s:\n" + log.read_text()[-2000:])
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def photos(shared_utkface, tmp_path_factory):
    crops = sorted(shared_utkface.glob("*.jpg"))[4000:4100]
    return make_photos(crops, 6, tmp_path_factory.mktemp("photos"), seed=5)


def test_predict_returns_the_json_of_predict_cli(service, bundle, photos):
    photo = photos[0]["file"]
    cli = subprocess.run([AGESCALE, "predict", str(bundle), photo, "--json"], capture_output=True, text=True,
                         timeout=120)
    expected = json.loads(cli.stdout)
    data = open(photo, "rb").read()
    status, got = _call(service + "/predict", *_multipart("photo.jpg", data))
    assert status == 200 and got["file"] == "photo.jpg" and got["latency_ms"] > 0
    for key in ("width", "height", "faces"):
        assert got[key] == expected[key]
    assert len(got["faces"]) == len(photos[0]["faces"]) >= 1
    status, raw = _call(service + "/predict", data, {"Content-Type": "application/octet-stream"})
    assert status == 200 and raw["faces"] == expected["faces"]                  # raw body, same answer


def test_health_ready_metadata_and_page(service):
    assert _call(service + "/healthz") == (200, {"status": "ok"})
    status, ready = _call(service + "/readyz")
    assert status == 200 and ready == {"ready": True, "detector": True}
    status, meta = _call(service + "/metadata")
    assert status == 200 and meta["card"]["model"]["backbone"] == "resnet18"
    assert meta["limits"]["max_upload_bytes"] == 1024 * 1024 and meta["limits"]["max_pixels"] == 2_000_000
    status, page = _call(service + "/")
    assert status == 200 and '<input type="file"' in page and "/predict?annotate=true" in page


def test_bad_uploads_are_4xx_with_a_reason_and_the_replica_lives(service, photos):
    good = open(photos[0]["file"], "rb").read()
    big = io.BytesIO()
    Image.new("RGB", (1600, 1400), (10, 20, 30)).save(big, format="PNG")   # small file, 2.24 M pixels
    narrow = io.BytesIO()
    Image.new("RGB", (4000, 2), (10, 20, 30)).save(narrow, format="PNG")   # would resize to gigabytes
    noise = io.BytesIO()
    Image.effect_noise((800, 800), 60).convert("RGB").save(noise, format="BMP")  # 1.9 MB
    cases = {
        "garbage": (b"this is not an image", 400, "not a readable image"),
        "truncated": (good[: len(good) // 3], 400, "not a readable image"),
        "empty": (b"", 400, "empty upload"),
        "too_many_pixels": (big.getvalue(), 413, "pixels is over the limit"),
        "too_large": (noise.getvalue(), 413, "over the limit"),
        "aspect_ratio": (narrow.getvalue(), 400, "aspect ratio over 8:1"),
    }
    for name, (data, code, reason) in cases.items():
        status, body = _call(service + "/predict", data, {"Content-Type": "application/octet-stream"})
        assert status == code and reason in body["detail"], (name, status, body)
        assert "\n" not in body["detail"]
    status, body = _call(service + "/predict", *_multipart("x.jpg", b"\x89PNG\r\n\x1a\n broken"))
    assert status == 400 and "not a readable image" in body["detail"]
    status, after = _call(service + "/predict", good, {"Content-Type": "application/octet-stream"})
    assert status == 200 and after["faces"]                                  # still serving
    stats = _call(service + "/stats")[1]
    assert stats["refused"] >= len(cases) + 1


def test_a_burst_is_served_in_fewer_model_calls_than_requests(service, shared_utkface):
    crops = [f.read_bytes() for f in sorted(shared_utkface.glob("*.jpg"))[:24]]
    before = _call(service + "/stats")[1]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda d: _call(service + "/predict?detect=false", d,
                                                {"Content-Type": "application/octet-stream"}), crops))
    assert all(s == 200 and 0 <= r["age"] <= 100 for s, r in results)
    after = _call(service + "/stats")[1]
    requests = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests == 24 and calls < requests and after["max_batch"] > 1, (requests, calls, after)


@pytest.mark.skipif(not shutil.which("chromedriver") and not os.environ.get("AGESCALE_REQUIRE_BROWSER"),
                    reason="Debian's chromium-driver is not installed (.ci/run installs it)")
def test_upload_page_in_headless_chromium(service, photos, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(service + "/")
        driver.find_element(By.ID, "file").send_keys(photos[1]["file"])
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.ID, "annotated")))
        rows = driver.find_elements(By.CSS_SELECTOR, "#faces tr")
        assert len(rows) == 1 + len(photos[1]["faces"])                    # header + one row per face
        img = driver.find_element(By.ID, "annotated")
        assert img.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", img) == Image.open(photos[1]["file"]).width
        assert "face(s) in" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "page.png"))
        # a bad upload shows the service's one-line reason
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text.startswith("400: not a readable image")
    finally:
        driver.quit()


def test_bench_serve_reports_rows_ratio_and_soak(bundle, shared_utkface, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([AGESCALE, "bench", "serve", str(bundle), "--images", str(shared_utkface), "--requests", "40",
                        "--rounds", "1", "--soak-s", "8", "--port", str(_free_port()), "--ort-spinning", "off",
                        "--model-seconds", "0.3", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(x["mode"], x["concurrency"]) for x in rows] == [(m, c) for c in (1, 8, 32) for m in ("batched", "unbatched")]
    for x in rows:
        assert x["requests"] == 40 and x["failures"] == 0 and x["server_5xx"] == 0 and x["throughput_rps"] > 0
        assert x["p50_ms"] <= x["p95_ms"] <= x["p99_ms"]
    on = next(x for x in rows if x["mode"] == "batched" and x["concurrency"] == 32)["throughput_rps"]
    off = next(x for x in rows if x["mode"] == "unbatched" and x["concurrency"] == 32)["throughput_rps"]
    assert result["ratio"] == pytest.approx(on / off, rel=0.01) and result["target"] == 1.5
    assert result["spin"] is False                                   # the JSON names the setting it ran with
    model = result["model_batch_gain"]                               # the ceiling of ratio: the model alone
    assert model["batch_1_img_s"] > 0
    assert model["gain"] == pytest.approx(model["batch_32_img_s"] / model["batch_1_img_s"], rel=0.01)
    soak = result["soak"]
    assert soak["requests"] > 100 and soak["server_5xx"] == 0 and soak["failures"] == 0 and soak["no_response"] == 0
    assert soak["status"]["corrupt"].get("400", 0) == soak["corrupt_sent"]          # every corrupt upload: a 400
    assert soak["replica_rss_start_mb"] > 0 and soak["rss_growth"] is not None
