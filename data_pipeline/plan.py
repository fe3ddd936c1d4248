"""Which samples each rank reads, batch by batch: the same for every backend.

An epoch's order is a permutation drawn from (seed, epoch) alone (training) or the stored
order (evaluation). Rank r takes every world-th sample of it, so after k batches the ranks
together have consumed exactly the first k * batch * world samples. The loader's position is
that one number, `offset`; resuming sets it, at any world size, and the remaining samples are
dealt to the new ranks the same way. Training drops the tail that would give ranks unequal
batch counts (a DDP hang otherwise); evaluation pads with repeats marked `valid = False`, so
every sample is counted exactly once across ranks and all ranks run the same number of batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankPlan:
    batches: np.ndarray  # (num_batches, batch) sample indices
    valid: np.ndarray    # (num_batches, batch) bool; False marks padding


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_plan(order: np.ndarray, offset: int, rank: int, world: int, batch: int, train: bool) -> RankPlan:
    rest = order[offset:]
    if train:
        per_rank = (len(rest) // world) // batch * batch
        mine = rest[rank::world][:per_rank]
        return RankPlan(mine.reshape(-1, batch), np.ones((len(mine) // batch, batch), bool))
    per_rank = -(-len(rest) // world)
    padded = -(-per_rank // batch) * batch
    mine = rest[rank::world]
    valid = np.zeros(padded, bool)
    valid[:len(mine)] = True
    fill = mine[-1] if len(mine) else (rest[0] if len(rest) else 0)
    mine = np.concatenate([mine, np.full(padded - len(mine), fill, dtype=mine.dtype)])
    return RankPlan(mine.reshape(-1, batch), valid.reshape(-1, batch))
