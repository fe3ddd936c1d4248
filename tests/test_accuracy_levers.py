"""The accuracy and speed levers: interval calibration, flip TTA, EMA, torch.compile,
channels_last, progressive resizing and method options, each by its outcome."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from conftest import AGESCALE, REPO, SAMPLE, run_cli
from data_pipeline.config import DataConfig, ProgressiveResize
from data_pipeline.loaders import create_loader
from trainer.run_config import load_config
from test_train import CONFIG, small, summary
from trainer import calibration
from trainer.config import ModelConfig
from trainer.evaluate import _batches
from trainer.export import write_onnx
from trainer.load import load_trained
from trainer.models import Ensemble, create_model
from trainer.models.ensemble import ZOOM, zoom


@pytest.fixture(scope="module")
def ema_run(utk_shards, tmp_path_factory):
    """A short real run with EMA, mixup and flip TTA on: calibrated at the end, tested with both
    (the EMA resume test below then also shows that mixup resumes exactly)."""
    run = tmp_path_factory.mktemp("ema") / "run"
    run_cli("train", CONFIG, *small(utk_shards, run, **{"train.ema_decay": 0.9, "model.tta": "hflip",
                                                           "train.mixup.alpha": 0.4}), check=True)
    return run


def _predictions(run, shards, split):
    cfg, model, _ = load_trained(run)
    cfg.data.loader.shards = str(shards)
    loader = create_loader(cfg.data, split, train=False)
    pred, age, scale = [], [], []
    for batch, res, predictor in _batches(model, loader, torch.device("cpu"), "none"):
        keep = batch["valid"]
        pred.append(res["age"][keep].double()), age.append(batch["age"][keep].double())
        scale.append(calibration.spread(res["distribution"][keep], predictor.ages, int(keep.sum())))
    return torch.cat(pred), torch.cat(age), torch.cat(scale)


def test_conformal_interval_covers_90_percent_of_held_out_real_faces(ema_run, utk_shards):
    # Real predictions of a trained model on 1,200 real faces (val + test); fit on one half,
    # check on the other.
    parts = [_predictions(ema_run, utk_shards, s) for s in ("val", "test")]
    pred, age, scale = (torch.cat([p[i] for p in parts]) for i in range(3))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(pred), generator=gen)
    fit_idx, hold = perm[: len(perm) // 2], perm[len(perm) // 2:]
    rule = calibration.fit(pred[fit_idx], age[fit_idx], scale[fit_idx], level=0.9)
    lo, hi = calibration.bounds(pred[hold], scale[hold], rule, 0, 100)
    covered = ((age[hold] >= lo) & (age[hold] <= hi)).double().mean().item()
    assert abs(covered - 0.90) <= 0.03, covered
    assert rule["n"] == len(fit_idx)
    # Too few faces for a 90 % quantile: refused, not silently capped.
    from base.errors import UserError
    with pytest.raises(UserError, match="at least 9 validation faces"):
        calibration.fit(pred[:5], age[:5], scale[:5])


def test_training_calibrates_and_the_bundle_and_predict_use_it(ema_run, utk_shards, tmp_path):
    rule = json.loads((ema_run / calibration.CALIBRATION).read_text())
    s = summary(ema_run)
    assert rule["split"] == "val" and rule["tta"] == "hflip" and rule["n"] == 601 and s["calibration"] == rule
    assert 0.80 <= s["test"]["interval90_coverage"] <= 0.97          # 599 test faces, fitted on 601 val faces
    out = tmp_path / "bundle"
    run_cli("export", ema_run, "--out", out, check=True)
    labels = json.loads((out / "labels.json").read_text())
    pre = json.loads((out / "preprocess.json").read_text())
    assert labels["interval"]["calibrated"] and labels["interval"]["q"] == rule["q"]
    assert pre["tta"]["mode"] == "hflip" and "inside model.onnx" in pre["tta"]["where"]
    img = sorted(SAMPLE.glob("*.jpg"))[0]
    r = run_cli("predict", out, img, "--json", "--no-detect", check=True)
    res = json.loads(r.stdout.splitlines()[0])
    lo, hi = res["interval90"]
    assert lo < res["age"] < hi and (hi - lo) / 2 >= rule["q"] * rule["std_floor"] - 0.02
    # evaluate uses the stored calibration (same TTA) and reports where it came from
    r = run_cli("evaluate", ema_run, "--data", utk_shards / "test", "--out", tmp_path / "ev", check=True)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["tta"] == "hflip" and "calibration.json" in report["interval_calibration"]["from"]
    assert report["metrics"]["mae"] == pytest.approx(s["test"]["mae"], abs=1e-4)
    assert report["metrics"]["interval90_coverage"] == pytest.approx(s["test"]["interval90_coverage"], abs=1e-6)
    assert set(report["metrics"]["mae_by_race_in_age_bin"]) >= {"20-29", "30-39"}
    assert "MAE by race within each age bin" in (tmp_path / "ev" / "report.md").read_text()


def test_export_with_another_tta_is_uncalibrated_unless_calibrate_on_fits_it(ema_run, utk_shards, tmp_path):
    # The run was calibrated with flip TTA; a zoom-TTA bundle cannot reuse that rule.
    plain, fitted = tmp_path / "plain", tmp_path / "fitted"
    run_cli("export", ema_run, "--out", plain, "--tta", "hflip_zoom", "--no-detector", check=True)
    labels = json.loads((plain / "labels.json").read_text())
    assert json.loads((plain / "preprocess.json").read_text())["tta"]["mode"] == "hflip_zoom"
    assert labels["interval"]["calibrated"] is False and "--calibrate-on" in labels["interval"]["rule"]
    run_cli("export", ema_run, "--out", fitted, "--tta", "hflip_zoom", "--no-detector",
            "--calibrate-on", utk_shards / "val", check=True)
    interval = json.loads((fitted / "labels.json").read_text())["interval"]
    stored = json.loads((ema_run / calibration.CALIBRATION).read_text())
    assert interval["calibrated"] is True and interval["n"] == 601 and interval["fitted_on"] == str(utk_shards / "val")
    assert interval["q"] != stored["q"]                        # refitted on the four views, not copied
    r = run_cli("export", ema_run, "--out", tmp_path / "bad", "--no-detector", "--calibrate-on", tmp_path / "nope")
    assert r.returncode == 2 and "--calibrate-on" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()  # refused before writing


def test_evaluate_at_another_framing_changes_the_pixels_and_drops_the_stored_calibration(ema_run, utk_shards,
                                                                                        tmp_path):
    from trainer.report import _reframe, evaluate_runs
    same = evaluate_runs([ema_run], utk_shards / "val", tmp_path / "same", image_size=32, crop_pct=1.0)
    plain = evaluate_runs([ema_run], utk_shards / "val", tmp_path / "plain")
    assert same["metrics"]["mae"] == plain["metrics"]["mae"] and same["framing"] == {"image_size": 32, "crop_pct": 1.0}
    assert "calibration.json" in same["interval_calibration"]["from"]        # the run's own framing: its rule holds
    big = evaluate_runs([ema_run], utk_shards / "val", tmp_path / "big", image_size=48, crop_pct=0.9)
    assert big["framing"] == {"image_size": 48, "crop_pct": 0.9}
    assert big["metrics"]["count"] == plain["metrics"]["count"] and big["metrics"]["mae"] != plain["metrics"]["mae"]
    assert big["interval_calibration"]["from"].startswith("not calibrated")  # fitted at 32 px, not re-used at 48
    refit = evaluate_runs([ema_run], utk_shards / "test", tmp_path / "refit", image_size=48,
                          calibrate_on=utk_shards / "val")
    assert refit["interval_calibration"]["n"] == 601
    r = run_cli("evaluate", ema_run, "--data", utk_shards / "val", "--crop-pct", "1.5", "--out", tmp_path / "bad")
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and "--crop-pct: eval_crop_pct" in err[0] and "1.5" in err[0]
    assert not (tmp_path / "bad").exists()
    from base.errors import UserError
    swin = load_config(CONFIG, ["model.backbone=swin_tiny_patch4_window7_224", "data.loader.image_size=32"])
    with pytest.raises(UserError, match="--image-size 48: .* built for 32 px input"):
        _reframe(swin, 48, None)
    assert _reframe(swin, None, 0.9) and swin.data.loader.eval_crop_pct == 0.9   # cropping works for any model


def test_evaluate_with_median_decoding_changes_the_ages_and_drops_the_mean_centred_calibration(ema_run, utk_shards,
                                                                                              tmp_path):
    from base.errors import UserError
    from trainer.report import evaluate_runs

    mean = evaluate_runs([ema_run], utk_shards / "val", tmp_path / "mean")
    med = evaluate_runs([ema_run], utk_shards / "val", tmp_path / "median", decode="median")
    assert (mean["decode"], med["decode"]) == ("mean", "median")
    assert med["metrics"]["count"] == mean["metrics"]["count"] and med["metrics"]["mae"] != mean["metrics"]["mae"]
    assert "calibration.json" in mean["interval_calibration"]["from"]
    assert med["interval_calibration"]["from"].startswith("not calibrated")  # centred on the mean: not re-used
    assert "decode mean" in med["interval_calibration"]["from"]
    assert "Age: the median" in (tmp_path / "median" / "report.md").read_text()
    r = run_cli("evaluate", ema_run, "--data", utk_shards / "val", "--decode", "median", "--out", tmp_path / "cli")
    assert r.returncode == 0 and "age: median" in r.stdout
    assert f"MAE {med['metrics']['mae']:.2f}" in r.stdout
    with pytest.raises(UserError, match="model.decode=median: method 'l1' predicts one number"):
        load_config(CONFIG, ["model.method=l1", "model.decode=median"])


def test_ema_weights_are_validated_saved_and_resumed(ema_run, utk_shards, tmp_path):
    best = load_file(str(ema_run / "best" / "model.safetensors"))
    step = json.loads((ema_run / "best" / "metrics.json").read_text())["step"]
    vals = [json.loads(l) for l in (ema_run / "metrics.jsonl").read_text().splitlines()]
    assert step in [v["step"] for v in vals if v["phase"] == "val"]
    final = torch.load(ema_run / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    key = "age.weight"
    assert not torch.allclose(final["ema"][key].float(), final["module"][key].float())  # EMA != raw weights
    if step == 12:                                      # best/ holds that step's EMA weights, not the raw ones
        assert torch.equal(best[key], final["ema"][key].float())
    # Resuming restores the EMA: rewind a copy of the run to its step-8 checkpoint (best/ and the
    # summary deleted), continue to step 12: the EMA weights equal the uninterrupted run's.
    cut = tmp_path / "cut"
    shutil.copytree(ema_run, cut)
    shutil.rmtree(cut / "checkpoints" / "step00000012")
    shutil.rmtree(cut / "best")
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "LATEST").write_text("step00000008\n")
    run_cli("train", CONFIG, *small(utk_shards, cut, **{"train.ema_decay": 0.9, "model.tta": "hflip",
                                                         "train.mixup.alpha": 0.4}), "--resume",
            check=True)
    again = torch.load(cut / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    for k in final["ema"]:
        assert torch.equal(final["ema"][k], again["ema"][k]), k
    if step == 12:  # the best model is the one both runs computed last: the same test result
        assert summary(cut)["test"]["mae"] == pytest.approx(summary(ema_run)["test"]["mae"])


def test_flip_tta_is_the_mean_of_the_two_passes_in_torch_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = create_model(ModelConfig(method="ldl"), 32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        one, mirrored = Ensemble([model])(x), Ensemble([model])(x.flip(3))
        both = Ensemble([model], hflip=True)(x)
    for k in ("age", "distribution", "gender_prob"):
        assert torch.allclose(both[k], (one[k] + mirrored[k]) / 2, atol=1e-6)
    assert not torch.allclose(one["age"], mirrored["age"])               # the mirror is really another pass
    names = write_onnx(model, 32, tmp_path / "m.onnx", tta="hflip")
    outs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})
    for name, got in zip(names, outs):
        np.testing.assert_allclose(got, both[name].numpy(), atol=1e-4)


def test_zoom_tta_adds_the_centre_crop_resized_and_its_mirror_in_torch_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = create_model(ModelConfig(method="ldl"), 40).eval()
    x = torch.randn(3, 3, 40, 40)
    # the 0.95 zoom of a 40 px input: its central 38 x 38 pixels, resized back to 40 x 40
    zoomed = torch.nn.functional.interpolate(x[..., 1:39, 1:39], size=(40, 40), mode="bilinear", align_corners=False)
    assert ZOOM == 0.95 and torch.equal(zoom(x, ZOOM), zoomed)
    with torch.no_grad():
        views = [Ensemble([model])(v) for v in (x, x.flip(3), zoomed, zoomed.flip(3))]
        four = Ensemble.for_tta([model], "hflip_zoom")(x)
        flip = Ensemble.for_tta([model], "hflip")(x)
    for k in ("age", "distribution", "gender_prob"):
        assert torch.allclose(four[k], sum(v[k] for v in views) / 4, atol=1e-6)
    assert (four["age"] - flip["age"]).abs().max() > 1e-4               # the zoomed views really count
    names = write_onnx(model, 40, tmp_path / "m.onnx", tta="hflip_zoom")
    outs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})
    for name, got in zip(names, outs):
        np.testing.assert_allclose(got, four[name].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'zoom'"):
        Ensemble.for_tta([model], "zoom")


@pytest.mark.slow
def test_compiled_model_matches_eager_and_trains_under_deepspeed(utk_shards, tmp_path):
    # ResNet-10-T (one block per stage): what is tested is compile under DeepSpeed and resume, and
    # inductor's compile time grows with the graph (ResNet-18 took ~2 min of this test on 2 cores).
    torch.manual_seed(0)
    model = create_model(ModelConfig(method="dex", backbone="resnet10t"), 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-4, rtol=1e-4)
    run = tmp_path / "run"
    # One validation (compiled eval) and no test/calibration passes: each extra pass recompiles.
    quick = {"train.compile": "true", "train.val_every_steps": 8, "train.test_at_end": "false",
             "train.calibrate": "false", "model.backbone": "resnet10t"}
    r = run_cli("train", CONFIG, *small(utk_shards, run, **quick, **{"train.max_steps": 8}), "train.channels_last=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back to eager" not in r.stderr            # engine.compile itself was available
    s = summary(run)
    assert s["steps"] == 8 and np.isfinite(s["best_val_mae"]) and s["best_val_mae"] < 60
    r = run_cli("train", CONFIG, *small(utk_shards, run, **quick, **{"train.max_steps": 10}), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run)["steps"] == 10


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = create_model(ModelConfig(method="dex"), 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a = model(x)["age"]
        b = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))["age"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_progressive_size_schedule():
    p = ProgressiveResize(start_size=40, start_epoch=1, end_epoch=5, multiple=8)
    assert [p.size_at(e, 64) for e in range(7)] == [40, 40, 40, 48, 56, 64, 64]
    assert ProgressiveResize().size_at(3, 64) == 64                     # off: always the final size
    with pytest.raises(ValueError, match="end_epoch"):
        ProgressiveResize(start_size=40, start_epoch=3, end_epoch=3)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_progressive_resize_loader_sizes_and_resume_mid_schedule(utk_shards, backend):
    cfg = DataConfig.model_validate({"loader": {
        "shards": str(utk_shards), "backend": backend, "batch_size": 400, "image_size": 48, "workers": 1,
        "progressive": {"start_size": 32, "start_epoch": 0, "end_epoch": 2, "multiple": 8}}})
    loader = create_loader(cfg, "train")
    sizes = []
    for _ in range(3):
        sizes.append({tuple(b["image"].shape[-2:]) for b in loader})
    assert sizes == [{(32, 32)}, {(40, 40)}, {(48, 48)}]
    # stop in the middle of epoch 1 (size 40), restore in a new loader: it continues at 40
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    fresh = create_loader(cfg, "train")
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert rest and {tuple(b["image"].shape[-2:]) for b in rest} == {(40, 40)} and fresh.epoch == 2
    assert create_loader(cfg, "val", train=False).image_size == 48      # evaluation: always the final size


def test_progressive_resize_refused_for_fixed_size_models():
    from base.errors import UserError
    for model in (["model.backbone=swin_tiny_patch4_window7_224"],
                  ["model.architecture=mivolo", "model.backbone=volo_d1_224"]):
        with pytest.raises(UserError, match="progressive resizing needs a convolutional backbone"):
            load_config(CONFIG, [*model, "data.loader.progressive.start_size=48"])
    assert load_config(CONFIG, ["data.loader.progressive.start_size=48"]).data.loader.progressive.start_size == 48


def test_method_args_reach_the_method_and_bad_ones_are_named():
    cfg = load_config(CONFIG, ["model.method=ldl", "model.method_args={sigma: 3.5}"])
    assert create_model(cfg.model, 32).method.sigma == 3.5
    cfg = load_config(CONFIG, ["model.method=dex", "model.method_args={label_smoothing: 0.1}"])
    m = create_model(cfg.model, 32).method
    out, age = torch.randn(2, m.out_features, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 20.0])
    target = torch.tensor([10, 20])
    smoothed = torch.nn.functional.cross_entropy(out, target, label_smoothing=0.1).item()
    assert m.label_smoothing == 0.1 and m.loss(out, age)["loss"].item() == pytest.approx(smoothed, abs=1e-5)
    assert smoothed != pytest.approx(torch.nn.functional.cross_entropy(out, target).item(), abs=1e-3)
    from base.errors import UserError
    with pytest.raises(UserError, match=r"model.method_args.sigmaa: not an option of method 'ldl'.*sigma"):
        load_config(CONFIG, ["model.method=ldl", "model.method_args={sigmaa: 3}"])


def test_ldl_lambda_l1_adds_the_expectation_l1_term_and_zero_keeps_the_plain_kl():
    """DLDL-v2's term: the loss gains lambda * |E[age] - age|; at 0 it is exactly the old KL."""
    plain = create_model(load_config(CONFIG, ["model.method=ldl"]).model, 32).method
    dldl = create_model(load_config(CONFIG, ["model.method=ldl", "model.method_args={lambda_l1: 2.0}"]).model, 32).method
    out = torch.randn(3, plain.out_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    age = torch.tensor([5.0, 33.0, 71.0])
    kl = torch.nn.functional.kl_div(torch.log_softmax(out, 1), plain.target(age), reduction="batchmean")
    assert set(plain.loss(out, age)) == {"loss"} and plain.loss(out, age)["loss"].item() == pytest.approx(kl.item(), abs=1e-6)
    parts = dldl.loss(out, age)
    expected_age = torch.softmax(out, 1) @ dldl.ages.float()
    l1 = (expected_age - age).abs().mean()
    assert parts["kl"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert parts["l1"].item() == pytest.approx(l1.item(), rel=1e-5) and parts["l1"].item() > 1.0
    assert parts["loss"].item() == pytest.approx(kl.item() + 2.0 * l1.item(), rel=1e-5)
    g_plain, = torch.autograd.grad(plain.loss(out, age)["loss"], out)
    g_dldl, = torch.autograd.grad(parts["loss"], out)
    assert (g_dldl - g_plain).abs().max().item() > 1e-3          # the term reaches the gradient
    from base.errors import UserError
    with pytest.raises(UserError, match=r"model.method_args.lambda_l1=-1.*0.0 to 100.0"):
        load_config(CONFIG, ["model.method=ldl", "model.method_args={lambda_l1: -1}"])


def test_mixup_draws_are_seeded_and_the_loss_blends_both_label_sets_without_padding():
    from trainer.mixup import mix_images, mixed_loss, mixup_pairs

    assert mixup_pairs(8, 0.0, 1.0) is None and mixup_pairs(8, 0.2, 0.0) is None and mixup_pairs(1, 0.2, 1.0) is None
    torch.manual_seed(5)
    lam, perm = mixup_pairs(8, 0.2, 1.0)
    torch.manual_seed(5)
    lam2, perm2 = mixup_pairs(8, 0.2, 1.0)           # the trainer seeds per step: a resume mixes the same pairs
    assert lam == lam2 and torch.equal(perm, perm2) and 0.5 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(8))
    torch.manual_seed(0)
    mixed = sum(mixup_pairs(8, 0.2, 0.3) is not None for _ in range(1000))
    assert 250 <= mixed <= 350                        # prob is the share of mixed batches
    x = torch.randn(4, 3, 8, 8)
    p = torch.tensor([1, 0, 3, 2])
    assert torch.allclose(mix_images(x.clone(), 0.75, p), 0.75 * x + 0.25 * x[p], atol=1e-6)
    # The loss: an L2 age loss of a fixed output against both label sets, weighted lam / 1 - lam;
    # a sample paired with loader padding counts in neither term.
    out = torch.tensor([10.0, 20.0, 30.0, 40.0])
    labels = {"age": torch.tensor([12.0, 18.0, 35.0, 0.0]), "valid": torch.tensor([True, True, True, False])}

    def l2(y):
        v = y["valid"]
        return {"loss": ((out[v] - y["age"][v]) ** 2).mean()}

    got = mixed_loss(l2, labels, 0.75, p)["loss"]
    # p pairs 0<->1 and 2<->3; 3 is padding, so only samples 0 and 1 count.
    a = ((10 - 12) ** 2 + (20 - 18) ** 2) / 2
    b = ((10 - 18) ** 2 + (20 - 12) ** 2) / 2
    assert got.item() == pytest.approx(0.75 * a + 0.25 * b)


_AUTOCAST_PROBE = r"""
import json, torch, deepspeed
from cluster.env import detect
from trainer.config import ModelConfig, TrainConfig
from trainer.distributed import init
from trainer.ds_config import deepspeed_config
from trainer.models import create_model
from trainer.schedule import make_optimizer, make_schedule
init(detect(), "cpu")
probe = {}
for precision in ("bf16_autocast", "fp32"):
    tc = TrainConfig(precision=precision)
    model = create_model(ModelConfig(method="ldl"), 32)
    opt = make_optimizer(model, tc.optimizer)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           lr_scheduler=make_schedule(opt, tc.optimizer, 10),
                                           config=deepspeed_config(tc, 4))
    seen = probe[precision] = {}
    engine.module.backbone.conv1.register_forward_hook(lambda m, i, o, s=seen: s.__setitem__("conv", str(o.dtype)))
    engine.module.backbone.bn1.register_forward_hook(lambda m, i, o, s=seen: s.__setitem__("bn", str(o.dtype)))
    engine(torch.randn(4, 3, 32, 32))
    seen["param"] = str(engine.module.backbone.conv1.weight.dtype)
    seen["bf16_comm"] = sum(getattr(p, "comm_dtype", None) == torch.bfloat16 for p in engine.module.parameters())
print(json.dumps(probe))
"""


def test_bf16_autocast_runs_convs_in_bf16_keeps_fp32_weights_and_resumes_exactly(utk_shards, tmp_path):
    """DeepSpeed's torch_autocast (train.precision=bf16_autocast): inside the engine's forward the
    convolutions compute in bf16 (and so BatchNorm's output is bf16) while the weights stay fp32;
    with fp32 nothing is bf16. The gradients of every parameter stay fp32 (no module is marked
    for bf16 communication). Both engines are probed in one process (one start-up, not two)."""
    import subprocess
    import sys

    from conftest import REPO
    r = subprocess.run([sys.executable, "-c", _AUTOCAST_PROBE], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["bf16_autocast"] == {"conv": "torch.bfloat16", "bn": "torch.bfloat16", "param": "torch.float32",
                                      "bf16_comm": 0}
    assert probe["fp32"] == {"conv": "torch.float32", "bn": "torch.float32", "param": "torch.float32",
                             "bf16_comm": 0}
    # Training: finite fp32 losses; resumed from its step-8 checkpoint (a copy of the run rewound
    # there), the run ends on the uninterrupted run's weights.
    opts = {"train.precision": "bf16_autocast", "train.max_steps": 12, "train.val_every_steps": 8,
            "train.ckpt_every_steps": 8, "train.test_at_end": "false", "train.calibrate": "false"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli("train", CONFIG, *small(utk_shards, full, **opts), check=True)
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step00000012")
    shutil.rmtree(cut / "best")
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "LATEST").write_text("step00000008\n")
    run_cli("train", CONFIG, *small(utk_shards, cut, **opts), "--resume", check=True)
    losses = [json.loads(l)["loss"] for l in (full / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["phase"] == "train"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert summary(cut)["steps"] == 12
    assert summary(cut)["param_checksums"] == summary(full)["param_checksums"]
    # Its checkpoints hold fp32 weights: a resume that would load them into DeepSpeed's bf16-weight
    # optimizer is refused in one line, naming the checkpoint, and the run is left as it was.
    before = sorted(p.name for p in (full / "checkpoints").iterdir())
    r = run_cli("train", CONFIG, *small(utk_shards, full, **{**opts, "train.precision": "bf16",
                                                             "train.max_steps": 16}), "--resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "step00000012 was saved without bf16 weights" in last and "train.precision=fp32" in last
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == before and summary(full)["steps"] == 12


def test_end_seconds_counts_each_tta_view_and_the_modes_agree_everywhere():
    from launch.cli import build_parser
    from trainer.budget import end_seconds
    from trainer.config import ModelConfig
    from trainer.export import TTA_TEXT
    from trainer.models.ensemble import TTA_VIEWS

    # 20 s for 2 validation passes = 10 s a pass; calibration + test, 4 views each, + 15 s of saving
    assert end_seconds(20.0, 4, True, True, 2) == 10 * 4 * 2 + 15
    assert end_seconds(20.0, 1, False, True, 2) == 10 + 15
    modes = set(TTA_VIEWS)
    assert modes == set(ModelConfig.model_fields["tta"].annotation.__args__) == set(TTA_TEXT) | {"none"}
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("evaluate", "export"):
        assert set(next(a for a in sub[command]._actions if a.dest == "tta").choices) == modes


def test_fit_steps_takes_the_longest_schedule_that_fits_the_budget():
    from trainer.budget import SAFETY, fit_steps

    kw = dict(elapsed_s=10.0, step=10, step_s=1.0, val_s=5.0, end_s=5.0, steps_per_epoch=20, val_every_steps=None)
    # 100 s budget -> 97 s planned: 10 + (n-10) + 5*validations + 5. n=65: 55 steps, epoch ends at 20,40,60
    # + the last step = 4 validations -> 10+55+20+5 = 90; n=70 -> 10+60+20+5 = 95 (70 is not an epoch end:
    # 20,40,60 + the last = 4); n=72 -> 97; n=73 -> 98 > 97.
    assert SAFETY == 0.97
    assert fit_steps(budget_s=100, max_total=1000, **kw) == 72
    assert fit_steps(budget_s=100, max_total=50, **kw) == 50   # the config's length is never exceeded
    assert fit_steps(budget_s=1, max_total=1000, **kw) == 11   # past its budget already: stop at the next step
    # A step that is both an epoch end and a val_every_steps multiple validates once: validations at
    # 10, 20, 30, 40 cost 40 s, plus 40 steps = 80 s <= 0.97 * 83; 41 steps add a step and a last validation.
    assert fit_steps(budget_s=83, elapsed_s=0.0, step=0, step_s=1.0, val_s=10.0, end_s=0.0, steps_per_epoch=20,
                     val_every_steps=10, max_total=1000) == 40


def test_validations_before_the_last_step_are_counted_once_each():
    from trainer.budget import validations_before

    assert validations_before(100, steps_per_epoch=20, val_every_steps=None) == 4      # 20, 40, 60, 80
    assert validations_before(100, steps_per_epoch=20, val_every_steps=30) == 6        # + 30, 90 (60 once)
    assert validations_before(30, steps_per_epoch=40, val_every_steps=None) == 0       # one short epoch: none


def test_step_timing_leaves_out_the_steps_before_the_first_validation_and_every_validation():
    from trainer import budget

    clock = iter([100.0, 130.0])  # the ends of the two validations below
    plan = budget.StepPlan(1000, clock=lambda: next(clock))
    assert plan.step_seconds(40, now=90.0) is None              # nothing timed before the first validation
    plan.validated(40, seconds=6.0)                             # ends at t = 100: timing starts here
    assert plan.step_seconds(40 + budget.MIN_TIMED - 1, now=109.0) is None  # too few steps timed yet
    plan.validated(60, seconds=5.0)                             # a second validation, 5 s of it left out
    assert plan.step_seconds(80, now=145.0) == pytest.approx((145.0 - 100.0 - 5.0) / 40)


def test_a_refit_expects_the_median_step_time_of_the_latest_three_stretches():
    """One stall is not extrapolated over the rest of the run; a slow-down that lasts is, after
    two stretches between validations."""
    from trainer import budget

    ends = iter([100.0, 121.0, 142.0, 193.0, 244.0])    # validation ends; each validation lasts 1 s
    plan = budget.StepPlan(1000, clock=lambda: next(ends))
    plan.validated(20, seconds=1.0)
    assert plan.recent_step_seconds(40, now=120.0) == pytest.approx(1.0)  # the stretch ending now: 20 s / 20 steps
    plan.validated(40, seconds=1.0)                                       # 121: 20 steps in 20 s
    plan.validated(60, seconds=1.0)                                       # 142: 20 steps in 20 s
    assert plan.recent_step_seconds(80, now=192.0) == pytest.approx(1.0)  # a 30-s stall in this one: median 1.0
    plan.validated(80, seconds=1.0)                                       # 193
    assert plan.recent_step_seconds(100, now=243.0) == pytest.approx(2.5)  # slow again: the median moves
    # a stretch shorter than MIN_TIMED steps is joined to the one before it: (9 + 20 steps, 7 + 50 s)
    assert plan.recent_step_seconds(80 + budget.MIN_TIMED - 1, now=200.0) == pytest.approx(1.0)
    assert plan.recent_validation_seconds(20.0) == 1.0                     # one slow validation: median 1 s


@pytest.mark.slow
@pytest.mark.serial
def test_time_budget_ends_the_run_inside_it_annealed_and_a_resume_keeps_the_fitted_schedule(utk_shards, tmp_path):
    """train.time_budget_min: a run asked for far more epochs than fit in 40 s fits its length at the second
    validation (the steps before the first are never timed), shortens it after a 6-s stall, ends inside the
    budget (process start to exit, as a user times it) with the learning rate at the cosine's floor, and a resume
    from a checkpoint before the end (given another budget) follows the saved length and ends on the
    uninterrupted run's weights."""
    import time

    opts = {"train.max_steps": "null", "train.epochs": 200, "train.time_budget_min": 0.67,
            "train.val_every_steps": 10, "train.ckpt_every_steps": 10, "train.optimizer.warmup_steps": 30,
            "train.test_at_end": "false", "train.calibrate": "false", "train.log_every_steps": 1}
    full, cut = tmp_path / "full", tmp_path / "cut"
    t0 = time.time()
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([AGESCALE, "train", str(CONFIG), *small(utk_shards, full, **opts)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    metrics = full / "metrics.jsonl"
    try:
        while proc.poll() is None and time.time() - t0 < 60 and not (
                metrics.exists() and '"budget"' in metrics.read_text()):
            time.sleep(0.1)
        # The machine stalls for 6 s after the length was fitted (SIGSTOP: as a busy neighbour or a
        # slow disk would): a later validation re-fits the length, shorter, and the budget still holds.
        proc.send_signal(signal.SIGSTOP)
        time.sleep(6)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    wall = time.time() - t0
    err = log.read_text()
    assert proc.returncode == 0, err
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    plan = [r for r in rows if r["phase"] == "budget"]
    # The second validation: steps 10-20 timed. Validating every 10 steps leaves validations after the stall
    # for the re-fit even on a slow CPU (at every 25, a 2-core AVX2 EPYC fitted 67 steps at step 50: none).
    assert plan[0]["step"] == 20 and not plan[0]["refit"]
    assert len(plan) >= 2 and all(r["refit"] for r in plan[1:]), plan
    assert all(b["total_steps"] < a["total_steps"] for a, b in zip(plan, plan[1:]))  # shortened, never lengthened
    assert "the run is shortened from" in err
    total = plan[-1]["total_steps"]
    assert total < plan[0]["planned_steps"] == 200 * json.loads((full / "run.json").read_text())["steps_per_epoch"]
    assert json.loads((full / "run.json").read_text())["total_steps"] == total
    assert summary(full)["steps"] == total
    assert wall <= 0.67 * 60 + 3, wall  # + the test harness's own process start
    last = [r for r in rows if r["phase"] == "train"][-1]
    assert last["step"] == total and last["lr"] == pytest.approx(2e-3 * 0.01, rel=1e-6)  # demo lr x min_lr_ratio
    # Resume from the first checkpoint after the decision, with another budget on the command line.
    tags = sorted(p.name for p in (full / "checkpoints").glob("step*"))
    shutil.copytree(full, cut)
    keep = next(t for t in tags if int(t[4:]) >= plan[-1]["step"])  # the length it saved is the final one
    for t in tags:
        if t != keep:  # only the kept one stays, so the resume cannot fall back to one before the fit
            shutil.rmtree(cut / "checkpoints" / t)
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "LATEST").write_text(keep + "\n")
    assert plan[-1]["step"] <= int(keep[4:]) < total
    run_cli("train", CONFIG, *small(utk_shards, cut, **{**opts, "train.time_budget_min": 5}), "--resume", check=True)
    assert summary(cut)["steps"] == total
    assert summary(cut)["param_checksums"] == summary(full)["param_checksums"]
