"""Metrics against hand-computed values, and a 2-process reduction equal to one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.metrics import AgeMetrics

PRED = torch.tensor([10.0, 24.0, 33.0, 60.0, 71.0, 5.0])
AGE = torch.tensor([12.0, 30.0, 30.0, 50.0, 70.0, 9.0])
GENDER = torch.tensor([0, 1, 1, 0, -1, 1])
GPROB = torch.tensor([0.2, 0.9, 0.4, 0.1, 0.7, 0.6])
RACE = torch.tensor([0, 0, 1, 1, 2, -1])


def test_hand_computed_values():
    m = AgeMetrics()
    m.update(PRED, AGE, gender=GENDER, gender_prob=GPROB, race=RACE)
    r = m.compute()
    errs = [2, 6, 3, 10, 1, 4]
    assert r["count"] == 6 and r["mae"] == pytest.approx(26 / 6)
    assert r["rmse"] == pytest.approx((sum(e * e for e in errs) / 6) ** 0.5)
    assert r["cs@5"] == pytest.approx(4 / 6)
    assert r["gender_accuracy"] == pytest.approx(4 / 5)        # one unknown; prob .4 for a woman is wrong
    # groups (true → predicted): 10s→10s, 30s→20s, 30s→30s, 50s→60s, 70s→70s, 0s→0s
    assert r["age_group_accuracy"] == pytest.approx(4 / 6)
    assert r["age_group_mean_abs_diff"] == pytest.approx(2 / 6)
    assert r["mae_by_race"] == pytest.approx({"white": 4.0, "black": 6.5, "asian": 1.0})
    assert r["mae_spread_race"] == pytest.approx(5.5)
    assert r["mae_by_gender"] == pytest.approx({"male": 6.0, "female": 13 / 3})


def test_worst_race_within_age_groups():
    # 20s: white errs 1, black errs 3 -> worst 3; 30s: white 2, asian 4 -> worst 4; 40s: white only
    # (no comparison); 50s: black 5 faces, white 4 (under 5, left out) -> one race, no comparison.
    cells = [(25, 0, 1), (25, 1, 3), (35, 0, 2), (35, 2, 4), (45, 0, 9)]
    age = torch.tensor([float(a) for a, _, _ in cells for _ in range(5)] + [55.0] * 9)
    race = torch.tensor([r for _, r, _ in cells for _ in range(5)] + [1] * 5 + [0] * 4)
    pred = age + torch.tensor([float(e) for _, _, e in cells for _ in range(5)] + [7.0] * 9)
    m = AgeMetrics()
    m.update(pred, age, race=race)
    assert m.compute()["worst_race_mae_in_age_groups"] == pytest.approx((10 * 3 + 10 * 4) / 20)
    single = AgeMetrics()
    single.update(pred[:5], age[:5], race=race[:5])
    assert "worst_race_mae_in_age_groups" not in single.compute()


def test_valid_mask_and_interval_coverage():
    m = AgeMetrics()
    ages = torch.arange(0.0, 101.0)
    dist_ = torch.zeros(3, 101)
    dist_[:, 28:33] = 0.2                                      # mass on 28..32
    m.update(torch.tensor([30.0, 30.0, 30.0]), torch.tensor([31.0, 40.0, 0.0]),
             valid=torch.tensor([True, True, False]), distribution=dist_, ages=ages)
    r = m.compute()
    assert r["count"] == 2 and r["mae"] == pytest.approx(5.5)
    assert r["interval90_coverage"] == pytest.approx(0.5) and r["interval90_mean_width"] == pytest.approx(4.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    m = AgeMetrics()
    sl = slice(0, 4) if rank == 0 else slice(4, 6)            # unequal halves: a mean of means would differ
    m.update(PRED[sl], AGE[sl], gender=GENDER[sl], gender_prob=GPROB[sl], race=RACE[sl])
    m.reduce()
    queue.put((rank, m.compute()))
    dist.destroy_process_group()


def test_two_process_reduction_equals_single_process():
    single = AgeMetrics()
    single.update(PRED, AGE, gender=GENDER, gender_prob=GPROB, race=RACE)
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = flat(single.compute())
    assert flat(results[0]) == pytest.approx(want) and flat(results[1]) == pytest.approx(want)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out
