"""Evaluation report, export bundle and the ONNX Runtime serving side."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import AGESCALE, REPO, SAMPLE, run_cli
from test_train import CONFIG, small
from trainer.config import ModelConfig
from trainer.export import ServingModel, write_onnx
from trainer.methods import list_methods
from trainer.models import create_model

SERVING_FORBIDDEN = ("torch", "deepspeed", "nvidia.dali", "ray", "timm", "webdataset", "trainer", "data_pipeline")


def test_evaluate_writes_report_and_plots_with_the_trainers_mae(trained_run, utk_shards, tmp_path):
    r = run_cli("evaluate", trained_run, "--data", utk_shards / "val", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    best = json.loads((trained_run / "best" / "metrics.json").read_text())
    assert report["metrics"]["count"] == 601
    assert report["metrics"]["mae"] == pytest.approx(best["mae"], abs=1e-4)   # same split, same model
    assert set(report["plots"]) == {"mae_by_age_bin.png", "pred_vs_true.png", "age_group_confusion.png",
                                    "interval_coverage.png", "gradcam.png"}
    for p in report["plots"]:
        with Image.open(tmp_path / "ev" / "plots" / p) as im:
            assert im.width > 200 and im.height > 200
    md = (tmp_path / "ev" / "report.md").read_text()
    assert f"| mae | {report['metrics']['mae']:.4f} |" in md and "MAE by race" in md


def test_evaluate_an_ensemble(trained_run, utk_shards, tmp_path):
    ckpt = trained_run / "checkpoints" / "step00000008"
    r = run_cli("evaluate", trained_run, ckpt, "--data", utk_shards / "test", "--out", tmp_path / "ens")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "ens" / "report.json").read_text())
    assert len(report["models"]) == 2 and report["metrics"]["count"] == 599


def test_bundle_contents(bundle, trained_run):
    assert {p.name for p in bundle.iterdir()} == {"model.safetensors", "model.onnx", "preprocess.json",
                                                  "labels.json", "card.md", "card.json", "detector"}
    assert {p.name for p in (bundle / "detector").iterdir()} == {"pnet.onnx", "rnet.onnx", "onet.onnx", "detector.json"}
    pre, labels = json.loads((bundle / "preprocess.json").read_text()), json.loads((bundle / "labels.json").read_text())
    assert pre["input_size"] == 32 and pre["channel_order"] == "RGB" and len(pre["mean"]) == 3
    assert labels["method"] == "dex" and labels["output_names"] == ["age", "distribution", "gender_prob"]
    card = json.loads((bundle / "card.json").read_text())
    assert card["data_manifest_sha256"] == json.loads((trained_run / "run.json").read_text())["data_manifest_sha256"]
    assert "non-commercial" in card["license"] and card["metrics"]["test"]["count"] == 599
    assert "MIT" in card["detector_license"] and "facenet-pytorch" in card["detector_license"]
    assert len(pre["align"]["template"]) == 5 and pre["align"]["crop_size"] == 200
    sess = ort.InferenceSession(str(bundle / "model.onnx"))
    for n in (1, 5):                                                         # dynamic batch dimension
        assert sess.run(None, {"image": np.zeros((n, 3, 32, 32), np.float32)})[0].shape == (n,)


def _real_batch(n=6, size=48):
    files = sorted(SAMPLE.glob("*.jpg"))[:n]
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32) / 255 for f in files])
    return torch.from_numpy(((x - 0.45) / 0.25).transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_onnx_runtime_matches_torch_for_every_method(method, tmp_path):
    torch.manual_seed(0)
    model = create_model(ModelConfig(method=method), 48).eval()
    names = write_onnx(model, 48, tmp_path / "m.onnx")
    x = _real_batch()
    with torch.no_grad():
        want = [t.numpy() for t in ServingModel(model)(x)]
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})
    assert len(got) == len(want) == len(names)
    for name, a, b in zip(names, got, want):
        assert np.abs(a - b).max() <= 1e-4, name


@pytest.mark.parametrize("method", [m.name for m in list_methods() if m.has_distribution])
def test_onnx_runtime_matches_torch_with_median_decoding(method, tmp_path):
    """model.decode=median runs inside the graph (cumsum, compare, gather): ONNX Runtime's ages
    equal torch's, and they are the medians, not the means, of the graph's distributions."""
    from trainer.methods import distribution_median

    torch.manual_seed(0)
    model = create_model(ModelConfig(method=method, decode="median"), 48).eval()
    write_onnx(model, 48, tmp_path / "m.onnx")
    x = _real_batch()
    with torch.no_grad():
        want = ServingModel(model)(x)[0].numpy()
    age, dist = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[:2]
    assert np.abs(age - want).max() <= 1e-3
    assert np.abs(age - distribution_median(torch.from_numpy(dist), 0).numpy()).max() <= 1e-3
    assert np.abs(age - dist @ np.arange(101)).max() > 0.01


def test_predict_uses_no_training_packages(bundle, tmp_path):
    big = tmp_path / "big.png"
    Image.open(next(SAMPLE.glob("*.jpg"))).resize((500, 300)).save(big)      # any size is resized
    (tmp_path / "notes.txt").write_text("not an image")
    code = ("import sys; from launch.cli import main; rc = main(sys.argv[1:]); "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {SERVING_FORBIDDEN!r} or m.startswith('nvidia.dali')]; "
            "print('LOADED', bad); sys.exit(rc)")
    files = [next(SAMPLE.glob("*.jpg")), tmp_path / "notes.txt", big]
    r = subprocess.run([sys.executable, "-c", code, "predict", str(bundle), *map(str, files), "--json", "--no-detect"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = r.stdout.splitlines()
    assert lines[-1] == "LOADED []" and r.returncode == 1                    # exit 1: one file failed
    results = [json.loads(l) for l in lines[:-1]]
    assert [x["file"] for x in results] == [str(f) for f in files]
    assert "error" in results[1] and "not a readable image" in results[1]["error"]
    for x in (results[0], results[2]):
        assert 0 <= x["age"] <= 100 and 0 <= x["female_prob"] <= 1 and x["interval90"][0] <= x["interval90"][1]


def test_predict_plain_output_and_bad_bundle(bundle, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for f in sorted(SAMPLE.glob("*.jpg"))[:40]:
        (folder / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([AGESCALE, "predict", str(bundle), str(folder), "--batch-size", "16", "--no-detect"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 40
    assert "age " in r.stdout and "P(female)" in r.stdout
    r = run_cli("predict", tmp_path, next(SAMPLE.glob("*.jpg")))
    assert r.returncode == 2 and "no model.onnx" in r.stderr


@pytest.mark.parametrize("damage", ["preprocess_not_json", "preprocess_lacks_keys", "labels_missing", "onnx_truncated"])
def test_a_damaged_bundle_file_is_one_line_naming_it(bundle, tmp_path, damage):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    name = {"preprocess_not_json": "preprocess.json", "preprocess_lacks_keys": "preprocess.json",
            "labels_missing": "labels.json", "onnx_truncated": "model.onnx"}[damage]
    path = b / name
    if damage == "preprocess_not_json":
        path.write_text('{"resize": ')
    elif damage == "preprocess_lacks_keys":
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "mean"}))
    elif damage == "labels_missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:5000])
    r = run_cli("predict", b, next(SAMPLE.glob("*.jpg")))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(path) in lines[0] and r.stdout == "", r.stderr[-1500:]


@pytest.mark.parametrize("which", ["best", "checkpoint"])
def test_damaged_weights_are_one_line_naming_the_file(trained_run, utk_shards, tmp_path, which):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    target = (run / "best" / "model.safetensors" if which == "best"
              else run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt")
    target.write_bytes(target.read_bytes()[:4096])
    arg = run if which == "best" else target.parent
    for cmd in (["evaluate", arg, "--data", utk_shards / "val", "--out", tmp_path / "ev"],
                ["export", arg, "--out", tmp_path / "bundle"]):
        r = run_cli(*cmd)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (cmd[0], r.stderr[-1500:])
        assert str(target) in lines[0], (cmd[0], lines)


def test_ort_spinning_off_reaches_every_session_and_changes_no_prediction(bundle):
    from serving.photo import PhotoPredictor

    key = "session.intra_op.allow_spinning"
    default, quiet = PhotoPredictor(bundle), PhotoPredictor(bundle, threads=1, spin=False)
    sessions = [quiet.model.session, *quiet.detector.nets.values()]
    assert len(sessions) == 4 and all(s.get_session_options().get_session_config_entry(key) == "0" for s in sessions)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in sessions)
    with pytest.raises(RuntimeError):            # the default leaves ONNX Runtime's own (spinning) setting
        default.model.session.get_session_options().get_session_config_entry(key)
    crops = [Image.open(f) for f in sorted(SAMPLE.glob("*.jpg"))[:6]]
    batch = np.stack([default.model.preprocess(c) for c in crops])
    a, b = default.model.predict_arrays(batch), quiet.model.predict_arrays(batch)
    assert [round(x["age"], 3) for x in a] == [round(x["age"], 3) for x in b] and len(a) == 6
