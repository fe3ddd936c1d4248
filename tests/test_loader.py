"""Loader factory on real shards of the shared UTKFace images: one contract for every backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipeline.augment import IDENTITY, draw_params
from data_pipeline.config import AugmentPolicy, DataConfig
from data_pipeline.loaders import create_loader
from data_pipeline.reader import DataError, ShardIndex
from base.errors import UserError


def config(shards, backend="dali", batch=32, **loader) -> DataConfig:
    cfg = DataConfig()
    cfg.loader.shards, cfg.loader.backend, cfg.loader.batch_size = str(shards), backend, batch
    for k, v in loader.items():
        setattr(cfg.loader, k, v)
    return cfg


@pytest.fixture(scope="module")
def json_labels(utk_shards) -> dict[str, dict]:
    """Labels read independently, with the webdataset library, from every split's JSON."""
    out = {}
    for tar in sorted(utk_shards.glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            out[s["__key__"]] = json.loads(s["json"])
    assert len(out) == 6000
    return out


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_contract_and_labels(utk_shards, json_labels, backend, split):
    loader = create_loader(config(utk_shards, backend), split)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for b in batches[:3]:
        assert b["image"].dtype == torch.float32 and b["image"].shape == (32, 3, 112, 112)
        assert b["age"].dtype == torch.float32 and b["gender"].dtype == torch.int64 and b["race"].dtype == torch.int64
        assert b["valid"].dtype == torch.bool and len(b["key"]) == 32
        for k, age, g, r in zip(b["key"], b["age"].tolist(), b["gender"].tolist(), b["race"].tolist()):
            assert (age, g, r) == (json_labels[k]["age"], json_labels[k]["gender"], json_labels[k]["race"])
        assert -3 < b["image"].mean().item() < 3 and b["image"].std().item() > 0.3  # normalised real faces


def test_backends_give_the_same_batches(utk_shards):
    dali = iter(create_loader(config(utk_shards, "dali"), "train"))
    torch_ = iter(create_loader(config(utk_shards, "torch"), "train"))
    for _ in range(2):
        a, b = next(dali), next(torch_)
        assert a["key"] == b["key"] and torch.equal(a["age"], b["age"]) and torch.equal(a["gender"], b["gender"])
        # same drawn augmentation, applied by DALI and by torchvision: close, not bit-equal
        assert (a["image"] - b["image"]).abs().mean().item() < 0.1


NO_AUG = dict(hflip=0, crop_scale=(1, 1), crop_ratio=(1, 1), rotation=0, brightness=0, contrast=0, saturation=0,
              hue=0, grayscale=0, blur=0)
KNOBS = {"hflip": dict(hflip=1.0), "crop": dict(crop_scale=(0.5, 1), crop_ratio=(0.75, 1.33)),
         "rotation": dict(rotation=30), "brightness": dict(brightness=0.4), "contrast": dict(contrast=0.4),
         "saturation": dict(saturation=0.4), "hue": dict(hue=0.1), "grayscale": dict(grayscale=1.0),
         "blur": dict(blur=1.0)}


def first_batch(shards, backend, ops="auto", **knobs):
    cfg = config(shards, backend, batch=16, workers=1, augment_ops=ops)
    cfg.loader.augment = AugmentPolicy(**{**NO_AUG, **knobs})
    return next(iter(create_loader(cfg, "train")))["image"]


@pytest.fixture(scope="module")
def unaugmented(utk_shards):
    return first_batch(utk_shards, "dali")


@pytest.mark.parametrize("knob", KNOBS)
@pytest.mark.parametrize("ops", ["fused", "dali"])
def test_each_augmentation_knob_means_the_same_in_dali_and_torchvision(utk_shards, unaugmented, knob, ops):
    """Both DALI implementations (the CPU's fused kernel, the GPU's DALI operators run on the
    CPU here) against the torch backend."""
    dali = first_batch(utk_shards, "dali", ops, **KNOBS[knob])
    tv = first_batch(utk_shards, "torch", **KNOBS[knob])
    effect = (dali - unaugmented).abs().mean().item()
    gap = (dali - tv).abs().mean().item()
    assert effect > 0.03, f"{knob} changed nothing"
    # interpolation and clipping differ slightly; a different definition would not fit here
    # (hue as HSV shift vs YIQ rotation measured gap/effect 1.04, contrast about 128: 0.74)
    assert gap < 0.2 * effect, f"{knob}: backends differ by {gap:.3f}, the augmentation itself changes {effect:.3f}"


def test_eval_transform_close_between_dali_and_torch(utk_shards):
    a = next(iter(create_loader(config(utk_shards, "dali"), "test")))
    b = next(iter(create_loader(config(utk_shards, "torch"), "test")))
    assert a["key"] == b["key"]
    diff = (a["image"] - b["image"]).abs()
    assert diff.mean().item() < 0.01 and diff.max().item() < 0.5


def test_synthetic_backend_contract(utk_shards):
    b = next(iter(create_loader(config(utk_shards, "synthetic", batch=8), "train")))
    assert b["image"].shape == (8, 3, 112, 112) and b["age"].shape == (8,) and b["gender"].dtype == torch.int64


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_two_ranks_see_every_eval_sample_once(utk_shards, backend):
    cfg = config(utk_shards, backend, batch=64)
    seen, lengths = [], []
    for rank in (0, 1):
        loader = create_loader(cfg, "val", rank=rank, world_size=2)
        lengths.append(len(loader))
        for b in loader:
            seen += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
    expected = [s.key for s in ShardIndex(utk_shards, "val").samples]
    assert lengths[0] == lengths[1] and sorted(seen) == sorted(expected)


def test_train_ranks_are_disjoint_with_equal_batches(utk_shards):
    cfg = config(utk_shards, "torch")
    plans = [create_loader(cfg, "train", rank=r, world_size=3).plan() for r in range(3)]
    assert len(plans[0].batches) == 4800 // 3 // 32
    assert len({len(p.batches) for p in plans}) == 1
    flat = [set(p.batches.ravel().tolist()) for p in plans]
    assert not (flat[0] & flat[1]) and not (flat[1] & flat[2]) and not (flat[0] & flat[2])


def test_same_seed_same_batches_other_epoch_other_order(utk_shards):
    cfg = config(utk_shards)
    a, b = iter(create_loader(cfg, "train")), iter(create_loader(cfg, "train"))
    for _ in range(2):
        x, y = next(a), next(b)
        assert x["key"] == y["key"] and torch.equal(x["image"], y["image"])
    e1 = next(iter(create_loader(cfg, "train", epoch=1)))
    assert e1["key"] != next(iter(create_loader(cfg, "train")))["key"]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_restart_at_batch_k_gives_the_same_batches(utk_shards, backend):
    cfg = config(utk_shards, backend, batch=16)
    full = create_loader(cfg, "train", epoch=2)
    n_full = len(full)
    it = iter(full)
    first = [next(it) for _ in range(6)]
    probe = create_loader(cfg, "train", epoch=2)
    pit = iter(probe)
    for _ in range(3):
        next(pit)
    state = probe.state_dict()
    assert state == {"split": "train", "epoch": 2, "offset": 48, "seed": 0, "num_samples": 4800}
    resumed = create_loader(cfg, "train")
    resumed.load_state_dict(state)
    assert len(resumed) == n_full - 3
    for want, got in zip(first[3:], resumed):
        assert want["key"] == got["key"] and torch.equal(want["image"], got["image"])


def test_resume_at_another_world_size_consumes_the_rest_once(utk_shards):
    cfg = config(utk_shards, "torch", batch=10)
    ranks = [create_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    consumed = set()
    for r in ranks:  # each rank trains 7 batches, then the job stops
        consumed |= set(r.plan().batches[:7].ravel().tolist())
        r.offset = 7 * 10 * 2
    single = create_loader(cfg, "train")
    single.load_state_dict(ranks[0].state_dict())
    rest = set(single.plan().batches.ravel().tolist())
    assert not consumed & rest and len(consumed | rest) == 4800


def test_epoch_advances_after_a_full_pass(utk_shards):
    loader = create_loader(config(utk_shards, "dali", batch=256), "val")
    n = sum(1 for _ in loader)
    assert n == len(create_loader(config(utk_shards, "dali", batch=256), "val")) and loader.state_dict()["epoch"] == 1


def _corrupt_one_jpeg(shards):
    """Zero out the body of one stored JPEG (size kept, so only decoding can notice)."""
    index = ShardIndex(shards, "val")
    ref = index.samples[5]
    tar = index.shards[ref.shard]
    data = bytearray(tar.read_bytes())
    off, size = ref.image
    data[off + 2:off + size] = bytes(size - 2)
    tar.write_bytes(bytes(data))
    return tar, ref.key


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_undecodable_sample_named_or_skipped(utk_shards_copy, backend):
    tar, key = _corrupt_one_jpeg(utk_shards_copy)
    with pytest.raises(DataError) as e:
        list(create_loader(config(utk_shards_copy, backend), "val"))
    assert tar.name in str(e.value) and key in str(e.value)
    loader = create_loader(config(utk_shards_copy, backend, on_bad_sample="skip"), "val")
    batches = list(loader)
    assert loader.skipped == 1 and sum(b["valid"].sum().item() for b in batches) == len(loader.index) - 1
    bad = [(b, i) for b in batches for i, k in enumerate(b["key"]) if k == key]
    assert len(bad) == 1 and not bad[0][0]["valid"][bad[0][1]]


def test_truncated_and_missing_files_are_named(utk_shards_copy):
    tar = utk_shards_copy / "val" / "val-000002.tar"
    tar.write_bytes(tar.read_bytes()[:10000])
    with pytest.raises(DataError, match="val-000002.tar: 10000 bytes, manifest says"):
        create_loader(config(utk_shards_copy), "val")
    (utk_shards_copy / "test" / "test-000001.idx").unlink()
    with pytest.raises(DataError, match="test-000001.idx: DALI index missing"):
        create_loader(config(utk_shards_copy), "test")
    with pytest.raises(UserError, match="no split 'holdout'"):
        create_loader(config(utk_shards_copy), "holdout")
    (utk_shards_copy / "manifest.json").write_text('{"splits": {"val": {}}}')
    with pytest.raises(UserError, match="manifest.json: not an agescale manifest"):
        create_loader(config(utk_shards_copy), "val")


def test_augment_params_depend_only_on_seed_epoch_sample():
    pol = AugmentPolicy()
    a, b = draw_params(pol, 0, 3, 100), draw_params(pol, 0, 3, 100)
    assert np.array_equal(a, b) and not np.array_equal(a, draw_params(pol, 0, 4, 100))
    assert np.all((a[:, 2] <= 1) & (a[:, 0] + a[:, 2] <= 1 + 1e-6) & (np.abs(a[:, 5]) <= 10))
    off = draw_params(AugmentPolicy(strength=0), 0, 0, 50)
    no_flip = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]  # strength 0: everything but the flip is the identity
    assert np.array_equal(off[:, no_flip], np.tile(IDENTITY[no_flip], (50, 1))) and 0 < off[:, 4].mean() < 1
    strong = AugmentPolicy(strength=2).scaled()
    assert strong.rotation == 20 and strong.crop_scale == pytest.approx((0.6, 1.0)) and strong.hflip == 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("split, bound", [("test", 0.02), ("train", 0.1)])
def test_gpu_batches_match_cpu(utk_shards, split, bound):
    """Evaluation: mixed decode against CPU decode. Training also: DALI's augmentation operators
    on the GPU against the fused CPU kernel, same parameters (the bound of
    test_backends_give_the_same_batches)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = next(iter(create_loader(config(utk_shards), split)))
    gpu = next(iter(create_loader(config(utk_shards, device="gpu"), split)))
    assert gpu["image"].is_cuda and cpu["key"] == gpu["key"]
    assert (gpu["image"].cpu() - cpu["image"]).abs().mean().item() < bound


def test_state_from_other_data_is_refused(utk_shards):
    loader = create_loader(config(utk_shards, "torch"), "train")
    with pytest.raises(UserError, match="num_samples=10"):
        loader.load_state_dict({**loader.state_dict(), "num_samples": 10})
