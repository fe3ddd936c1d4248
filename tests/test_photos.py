"""Ordinary photos: detection + alignment, predict on photos, the Triton repository export."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from bench.photos import make_photos, score_photos
from conftest import REPO, run_cli
from serving.align import UTKFACE_TEMPLATE, align, measure_template, similarity
from serving.detect import FaceDetector
from serving.photo import PhotoPredictor

FORBIDDEN = ("torch", "deepspeed", "ray", "timm", "webdataset", "trainer", "data_pipeline")


@pytest.fixture(scope="module")
def photos(shared_utkface, tmp_path_factory):
    crops = sorted(shared_utkface.glob("*.jpg"))[2000:2400]
    return make_photos(crops, 40, tmp_path_factory.mktemp("photos"), seed=3)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ (scale * rot).T + shift
    m = similarity(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], shift, atol=1e-9)


def test_template_matches_the_training_crops(bundle, shared_utkface):
    """The stored template is where the detector finds the landmarks inside UTKFace crops."""
    det = FaceDetector(bundle / "detector", threads=1)
    files = sorted(shared_utkface.glob("*.jpg"))
    random.Random(0).shuffle(files)
    files = files[-100:]                                  # the template was measured on the first 1,000
    mean, found = measure_template(det, (Image.open(f) for f in files))
    assert found >= 97
    assert np.abs(mean - np.array(UTKFACE_TEMPLATE)).max() < 3.0, mean.round(1).tolist()


def test_aligned_faces_are_framed_like_the_crops(bundle, shared_utkface):
    """A crop pasted at a random size and place into a larger picture, detected and aligned, comes
    back as (nearly) the same crop: pixel correlation with the original, against a 12-px shift."""
    det = FaceDetector(bundle / "detector", threads=1)
    rng = random.Random(0)
    corr, shifted = [], []
    for f in sorted(shared_utkface.glob("*.jpg"))[3000:3030]:
        crop = Image.open(f).convert("RGB")
        s = rng.randint(100, 300)
        canvas = Image.new("RGB", (3 * s, 2 * s), (90, 140, 60))
        canvas.paste(crop.resize((s, s), Image.Resampling.LANCZOS), (rng.randint(0, 2 * s), rng.randint(0, s)))
        faces = det.detect(canvas)
        assert faces, f
        aligned = np.asarray(align(canvas, faces[0].landmarks, UTKFACE_TEMPLATE, 200).convert("L"), float)
        orig = np.asarray(crop.convert("L"), float)
        moved = np.asarray(crop.convert("L").rotate(0, translate=(12, 12)), float)
        inner = (slice(20, 180), slice(20, 180))
        corr.append(np.corrcoef(aligned[inner].ravel(), orig[inner].ravel())[0, 1])
        shifted.append(np.corrcoef(moved[inner].ravel(), orig[inner].ravel())[0, 1])
    assert np.mean(corr) > 0.85 and min(corr) > 0.6, np.round(corr, 2)
    assert np.mean(corr) > np.mean(shifted) + 0.3


def test_detection_recall_and_age_agreement_on_composited_photos(bundle, photos):
    score = score_photos(PhotoPredictor(bundle, threads=1), photos)
    assert score["faces"] >= 80
    assert score["recall"] >= 0.95 and score["precision"] >= 0.95, score
    assert score["age_abs_delta_mean"] < 2.0, score   # a barely trained model: see the README for a real one


def test_predict_on_photos_json_annotate_and_no_face(bundle, photos, tmp_path):
    empty = tmp_path / "empty.jpg"
    Image.new("RGB", (400, 300), (30, 120, 200)).save(empty)
    files = [photos[0]["file"], photos[1]["file"], str(empty)]
    code = ("import sys; from launch.cli import main; rc = main(sys.argv[1:]); "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('nvidia.dali')]; "
            "print('LOADED', bad); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(bundle), *files, "--json", "--annotate",
                        str(tmp_path / "ann")], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = r.stdout.splitlines()
    assert lines[-1] == "LOADED []" and r.returncode == 0, r.stderr[-1500:]   # a photo without a face is no error
    results = [json.loads(x) for x in lines[:-1]]
    for res, truth in zip(results[:2], photos[:2]):
        assert len(res["faces"]) == len(truth["faces"])
        for face in res["faces"]:
            assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and face["detection_score"] >= 0.9
            assert 0 <= face["age"] <= 100 and face["interval90"][0] <= face["age"] <= face["interval90"][1]
            assert 0 <= face["female_prob"] <= 1
        with Image.open(res["annotated"]) as ann, Image.open(res["file"]) as orig:
            assert ann.size == orig.size
            assert np.abs(np.asarray(ann, float) - np.asarray(orig.convert("RGB"), float)).mean() > 0.5
    assert results[2]["faces"] == [] and results[2]["note"] == "no face found"


def test_triton_repository_parses_and_matches_the_graph(trained_run, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    r = run_cli("export", trained_run, "--out", tmp_path / "repo", "--format", "triton", "--max-batch-size", "16")
    assert r.returncode == 0, r.stderr[-1500:]
    model_dir = tmp_path / "repo" / "agescale"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert config.HasField("dynamic_batching")
    graph = onnx.load(str(model_dir / "1" / "model.onnx")).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in [*graph.input, *graph.output]}
    assert [i.name for i in config.input] == ["image"] and list(config.input[0].dims) == dims["image"] == [3, 32, 32]
    assert [o.name for o in config.output] == ["age", "distribution", "gender_prob"]
    for o in config.output:
        if dims[o.name]:
            assert list(o.dims) == dims[o.name]
        else:                                     # a per-sample scalar: [1] reshaped to []
            assert list(o.dims) == [1] and o.HasField("reshape") and list(o.reshape.shape) == []
    assert model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP32"


def test_bench_detect_json(bundle, shared_utkface, tmp_path):
    out = tmp_path / "detect.json"
    r = run_cli("bench", "detect", bundle, "--images", shared_utkface, "--photos", "6", "--crops", "12", "--out", out)
    assert r.returncode == 0, r.stderr[-1500:]
    result = json.loads(out.read_text())
    photos, crops = result["composited_photos"], result["padded_crops"]
    assert photos["photos"] == 6 and photos["faces"] >= 6 and photos["recall"] >= 0.9
    assert photos["matched"] <= min(photos["faces"], photos["detected"])
    assert crops["crops"] == 12 and crops["found"] + crops["missed"] == 12 and crops["found"] >= 11
    assert 0 <= crops["age_abs_delta_median"] <= crops["age_abs_delta_p90"]


def test_a_crowd_photo_reports_the_largest_faces_and_says_how_many_were_left_out(bundle, shared_utkface,
                                                                                 monkeypatch):
    import serving.photo as photo_mod

    entry = next(e for e in make_photos(sorted(shared_utkface.glob("*.jpg"))[:40], 20,
                                        bundle.parent / "crowd", seed=9) if len(e["faces"]) >= 3)
    monkeypatch.setattr(photo_mod, "MAX_FACES", 2)
    with Image.open(entry["file"]) as im:
        result = PhotoPredictor(bundle, threads=1).predict_photo(im)
    sizes = [f["box"][2] - f["box"][0] for f in result["faces"]]
    assert len(result["faces"]) == 2 and sizes == sorted(sizes, reverse=True)
    assert result["note"] == f"only the 2 largest faces are reported ({len(entry['faces']) - 2} more left out)"
    assert all("more_faces_left_out" not in f for f in result["faces"])
