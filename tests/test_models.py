"""Backbones, heads, multi-task loss, DRF and ensembles."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from base.errors import UserError
from trainer.config import ModelConfig
from trainer.losses import multitask_loss
from trainer.methods import create_method
from trainer.models import Ensemble, create_model
from trainer.models.backbone import create_backbone


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("resnet34", 64), ("resnet50", 64),
                                        ("swin_tiny_patch4_window7_224", 112),
                                        ("swin_small_patch4_window7_224", 112)])
def test_backbones_by_name_at_the_config_size(name, size):
    m = create_model(ModelConfig(backbone=name, method="dex", race_head=True, attention=True), size).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert out["age"].shape == (2, 101) and out["gender"].shape == (2,) and out["race"].shape == (2, 5)
    assert torch.allclose(out["attention"].flatten(1).sum(1), torch.ones(2))   # a distribution over positions


def test_weights_from_a_local_file(tmp_path):
    src = create_backbone("resnet18", 64)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for f in ("w.pth", "w.safetensors"):
        loaded = create_backbone("resnet18", 64, weights=str(tmp_path / f))
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    fresh = create_backbone("resnet18", 64)
    assert not torch.equal(fresh.conv1.weight, src.conv1.weight)  # the load did something
    with pytest.raises(UserError, match="does not fit the backbone"):
        create_backbone("resnet34", 64, weights=str(tmp_path / "w.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pth: not a readable state dict"):
        create_backbone("resnet18", 64, weights=str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="not a timm model"):
        create_backbone("resnet19", 64)


def test_unknown_labels_are_masked_out_of_their_loss():
    cfg = ModelConfig(method="l1", race_head=True)
    method = create_method("l1")
    out = {"age": torch.zeros(4, 1), "gender": torch.tensor([2.0, -1.0, 0.5, 3.0]), "race": torch.zeros(4, 5)}
    batch = {"age": torch.tensor([35.0, 45.0, 25.0, 99.0]), "gender": torch.tensor([1, 0, -1, 1]),
             "race": torch.tensor([-1, -1, 2, -1]), "valid": torch.tensor([True, True, True, False])}
    parts = multitask_loss(out, batch, method, cfg)
    assert parts["age"].item() == pytest.approx((0 + 10 + 10) / 3)       # padding (99) excluded
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    assert parts["gender"].item() == pytest.approx(bce.item())             # unknown gender excluded
    assert parts["race"].item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
    assert parts["loss"].item() == pytest.approx(parts["age"].item() + parts["gender"].item() + 0.5 * parts["race"].item())


def test_gender_conditioned_age_uses_the_predicted_gender():
    m = create_model(ModelConfig(method="l1", gender_conditioned_age=True), 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = m(x)["age"]
        m.gender.bias += 5.0  # change only the gender prediction
        assert not torch.allclose(m(x)["age"], base)
    with pytest.raises(ValueError, match="needs gender_head"):
        ModelConfig(gender_conditioned_age=True, gender_head=False)


def test_forest_routing_and_distribution():
    method = create_method("drf", min_age=0, max_age=100)
    head = method.head(32)
    out = head(torch.randn(6, 32))
    route = out.view(6, method.trees, -1)
    assert torch.allclose(route.sum(2), torch.ones(6, method.trees), atol=1e-5)   # each tree routes all mass
    dist = method.distribution(out)
    assert torch.allclose(dist.sum(1), torch.ones(6), atol=1e-5)
    with torch.no_grad():
        head.mu.fill_(42.0)
    assert torch.allclose(method.predict(head(torch.randn(3, 32))), torch.full((3,), 42.0))


def test_ensemble_averages_distributions_and_gender():
    cfg = ModelConfig(method="dex")
    a, b = create_model(cfg, 64).eval(), create_model(cfg, 64).eval()
    x = torch.randn(3, 3, 64, 64)
    res = Ensemble([a, b]).predict(x)
    with torch.no_grad():
        pa, pb = torch.softmax(a(x)["age"], 1), torch.softmax(b(x)["age"], 1)
        ga, gb = torch.sigmoid(a(x)["gender"]), torch.sigmoid(b(x)["gender"])
    assert torch.allclose(res["distribution"], (pa + pb) / 2, atol=1e-6)
    assert torch.allclose(res["age"], ((pa + pb) / 2) @ torch.arange(101.0), atol=1e-4)
    assert torch.allclose(res["gender_prob"], (ga + gb) / 2)
    mixed = Ensemble([a, create_model(ModelConfig(method="l1"), 64).eval()]).predict(x)
    assert "distribution" not in mixed and mixed["age"].shape == (3,)
