"""Age-method losses and decoding rules against values computed by hand on small inputs."""

import math

import pytest
import torch

from trainer.methods import create_method, list_methods
from base.errors import UserError


def test_registry():
    from trainer.config import METHOD_NAMES

    assert tuple(m.name for m in list_methods()) == METHOD_NAMES  # the config's copy, kept in step
    assert {m.name for m in list_methods()} == {"l1", "l2", "smooth_l1", "dex", "coral", "mean_variance",
                                                 "mean_residue", "ldl", "drf", "l2_range", "gaussian_blend"}
    with pytest.raises(UserError, match="unknown age method 'dldl'"):
        create_method("dldl")


def test_regression_losses():
    out, age = torch.tensor([[0.5], [-0.25]]), torch.tensor([40.0, 30.0])  # predictions 45 and 30
    assert create_method("l1").predict(out).tolist() == [45.0, 30.0]
    assert create_method("l1").loss(out, age)["loss"].item() == pytest.approx(2.5)
    assert create_method("l2").loss(out, age)["loss"].item() == pytest.approx(12.5)
    assert create_method("smooth_l1").loss(out, age)["loss"].item() == pytest.approx(2.25)


def test_mivolo_range_target_and_swinface_blend():
    m = create_method("l2_range", min_age=0, max_age=100)
    out, age = torch.tensor([[0.1], [-0.2]]), torch.tensor([70.0, 30.0])   # predictions 60 and 30
    assert m.predict(out).tolist() == pytest.approx([60.0, 30.0])
    assert m.loss(out, age)["loss"].item() == pytest.approx((0.1 ** 2 + 0.0) / 2)  # in normalised units
    g = create_method("gaussian_blend", sigma=5.0, blend_until=0.5)
    out, age = torch.tensor([[0.5]]), torch.tensor([35.0])                  # prediction 45: error 10
    g.set_progress(0.0)
    assert g.loss(out, age)["loss"].item() == pytest.approx(0.25)           # (10 / 20)^2
    g.set_progress(0.25)                                                     # half-way through the blend
    assert g.loss(out, age)["loss"].item() == pytest.approx(0.5 * 0.25 + 0.5 * (1 - math.exp(-2)))
    g.set_progress(0.9)                                                      # blend done: bounded by 1
    assert g.loss(torch.tensor([[5.0]]), age)["loss"].item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="blend_until=0"):
        create_method("gaussian_blend", blend_until=0)


def test_dex_is_the_softmax_expectation():
    m = create_method("dex", min_age=0, max_age=2)
    out = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    assert m.predict(out).item() == pytest.approx(1.0)
    assert m.loss(out, torch.tensor([1.0]))["loss"].item() == pytest.approx(-math.log(0.5))


def test_coral_loss_prediction_and_rank_consistency():
    m = create_method("coral", min_age=0, max_age=3)
    out = torch.zeros(1, 3)
    assert m.loss(out, torch.tensor([2.0]))["loss"].item() == pytest.approx(3 * math.log(2))
    assert m.predict(out).item() == pytest.approx(1.5)
    head = m.head(16)
    p = torch.sigmoid(head(torch.randn(8, 16)))
    assert torch.all(p[:, 1:] <= p[:, :-1] + 1e-7)          # non-increasing in the rank
    dist = m.distribution(head(torch.randn(4, 16)))
    assert torch.allclose(dist.sum(1), torch.ones(4))


def test_mean_variance_formula():
    m = create_method("mean_variance", min_age=0, max_age=2)
    out = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))          # p = .25 .5 .25: mean 1, variance .5
    parts = m.loss(out, torch.tensor([2.0]))
    assert parts["mean"].item() == pytest.approx(0.5) and parts["variance"].item() == pytest.approx(0.5)
    assert parts["loss"].item() == pytest.approx(-math.log(0.25) + 0.2 * 0.5 + 0.05 * 0.5)


def test_mean_residue_entropy_outside_dynamic_top_k():
    m = create_method("mean_residue", min_age=0, max_age=3)
    p = torch.tensor([[0.05, 0.7, 0.05, 0.2], [0.25, 0.25, 0.25, 0.25]])
    # row 0: top ages .7 + .2 reach .9, the two .05 are the residue; row 1: .25 * 3 < .9, keep all 4
    assert m.residue(p).tolist() == pytest.approx([-2 * 0.05 * math.log(0.05), 0.0])
    parts = m.loss(torch.log(p), torch.tensor([1.0, 2.0]))
    assert parts["loss"].item() == pytest.approx(
        (parts["softmax"] + 0.2 * parts["mean"] + 0.1 * parts["residue"]).item())


def test_ldl_target_and_zero_kl_at_the_target():
    m = create_method("ldl", min_age=0, max_age=100)
    t = m.target(torch.tensor([30.0]))
    assert t.sum().item() == pytest.approx(1.0) and t.argmax().item() == 30
    logits = -0.5 * ((torch.arange(101.0) - 30) / 2.0)[None] ** 2   # the target's log, unnormalised
    assert m.loss(logits, torch.tensor([30.0]))["loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert m.loss(logits, torch.tensor([40.0]))["loss"].item() > 1.0
    assert m.predict(logits).item() == pytest.approx(30.0, abs=1e-3)


def test_ldl_width_grows_with_age():
    """sigma_per_year: the target's standard deviation is sigma + sigma_per_year * age."""
    m = create_method("ldl", min_age=0, max_age=100, sigma=1.0, sigma_per_year=0.05)
    ages = torch.arange(101.0)
    t = m.target(torch.tensor([10.0, 40.0, 60.0]))
    mean = t @ ages
    std = ((t * (ages[None] - mean[:, None]) ** 2).sum(1)).sqrt()
    assert mean.tolist() == pytest.approx([10.0, 40.0, 60.0], abs=1e-3)
    assert std.tolist() == pytest.approx([1.5, 3.0, 4.0], abs=0.01)
    flat = create_method("ldl", min_age=0, max_age=100)  # default: one width for every age
    assert torch.allclose(flat.target(torch.tensor([60.0])), create_method(
        "ldl", min_age=0, max_age=100, sigma=2.0, sigma_per_year=0.0).target(torch.tensor([60.0])))
    with pytest.raises(UserError, match="sigma_per_year"):
        create_method("ldl", sigma_per_year=-0.1)


def test_forest_loss_is_the_mixture_nll():
    m = create_method("drf", min_age=0, max_age=100)
    head = m.head(8)
    with torch.no_grad():
        head.mu.fill_(60.0)
        head.mu[:, 0] = 30.0
        head.log_sigma.fill_(math.log(2.0))
    leaves = 2 ** m.depth
    route = torch.zeros(1, m.trees, leaves)
    route[:, :, 0] = 0.5
    route[:, :, 1] = 0.5            # half the mass on the leaf at 30, half on one at 60
    out = route.flatten(1)
    gauss = lambda y, mu: math.exp(-0.5 * ((y - mu) / 2) ** 2) / (2 * math.sqrt(2 * math.pi))  # noqa: E731
    assert m.loss(out, torch.tensor([31.0]))["loss"].item() == pytest.approx(
        -math.log(0.5 * gauss(31, 30) + 0.5 * gauss(31, 60)), rel=1e-5)
    assert m.predict(out).item() == pytest.approx(45.0)


def test_median_decode_is_the_distributions_median_and_lowers_the_expected_absolute_error():
    from trainer.methods import distribution_median

    p = torch.zeros(3, 101)
    p[0, 30] = 1.0                                   # all mass at 30: the median is 30
    p[1, 20:30] = 0.1                                # uniform over 20..29: mass on [19.5, 29.5], median 24.5
    p[2, 10], p[2, 11], p[2, 60] = 0.3, 0.3, 0.4     # skewed: mean 30.3, median inside age 11's half-year
    assert distribution_median(p, 0).tolist() == pytest.approx([30.0, 24.5, 10.5 + 0.2 / 0.3])
    assert distribution_median(p[:, 5:], 5).tolist() == pytest.approx([30.0, 24.5, 10.5 + 0.2 / 0.3])
    # The median minimises the expected |age - estimate| under the distribution; the mean does not.
    m = create_method("ldl", min_age=0, max_age=100, decode="median")
    logits = torch.log(p[2:].clamp_min(1e-9))
    med, mean = m.estimate(logits), create_method("ldl").estimate(logits)
    assert mean.item() == pytest.approx(0.3 * 10 + 0.3 * 11 + 0.4 * 60, abs=1e-3)
    # each age's mass spread evenly over its year, as the median reads it: 100 points per year
    grid = (torch.arange(101.0)[:, None] + (torch.arange(100) + 0.5)[None] / 100 - 0.5).flatten()
    mass = p[2].repeat_interleave(100) / 100
    expected_abs = lambda c: float((mass * (grid - c).abs()).sum())  # noqa: E731
    assert expected_abs(med.item()) < expected_abs(mean.item()) - 3.5
    assert expected_abs(med.item()) <= min(expected_abs(c) for c in torch.linspace(0, 100, 2001).tolist()) + 1e-4
    # every method with a distribution takes it; the regressions, which have none, refuse it
    for cls in list_methods():
        if cls.has_distribution:
            assert create_method(cls.name, decode="median").decode == "median"
        else:
            with pytest.raises(UserError, match=f"model.decode=median: method '{cls.name}' predicts one number"):
                create_method(cls.name, decode="median")
    with pytest.raises(UserError, match="model.decode='mode'"):
        create_method("dex", decode="mode")
