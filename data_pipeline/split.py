"""Deterministic train/val/test assignment: subject-disjoint, stratified by age bin.

Samples of one subject form one group (a sample without a subject id is its own group). Groups
are binned by their median age; inside each bin they are shuffled with the seed and dealt, one
at a time, to the split furthest below its share of that bin. The result depends only on the
records (sorted by key first), the ratios and the seed, never on file-system order.
"""

from __future__ import annotations

import random
import statistics

import numpy as np

from data_pipeline.config import LabelConfig
from data_pipeline.record_table import RecordTable
from data_pipeline.records import age_bin, age_bin_names


def group_ids(keys: np.ndarray, table: RecordTable) -> np.ndarray:
    """Each sample's group: '<source>/subject/<subject>', or its own key when it has no subject."""
    if not any(table.subject[i] is not None for i in range(len(table))):
        return keys
    return np.array([keys[i] if table.subject[i] is None else
                     f"{table.source_name(i)}/subject/{table.subject[i]}".encode("utf-8", "surrogateescape")
                     for i in range(len(table))])


def assign_splits(keys: np.ndarray, table: RecordTable, ratios: dict[str, float], seed: int,
                  labels: LabelConfig) -> dict[str, np.ndarray]:
    """Map split name → the table indices of its samples, shuffled with the seed. `keys[i]` is
    sample i's key (bytes). Vectorised over numpy arrays so that no Python object per sample
    outlives a step; group and key order are bytewise, which is Python's str order for UTF-8."""
    _, group_of, sizes = np.unique(group_ids(keys, table), return_inverse=True, return_counts=True)
    ages = table.numpy("age")
    group_age = np.zeros(len(sizes))
    group_age[group_of] = ages          # one-face groups (all of UTKFace): the face's age
    if (sizes > 1).any():               # larger groups: their median age
        by_group = np.argsort(group_of, kind="stable")
        ends = np.cumsum(sizes)
        for g in np.flatnonzero(sizes > 1):
            group_age[g] = statistics.median(ages[by_group[ends[g] - sizes[g]:ends[g]]].tolist())
    bin_names = age_bin_names(labels)
    distinct, age_of_group = np.unique(group_age, return_inverse=True)
    group_bin = np.array([bin_names.index(age_bin(a, labels)) for a in distinct.tolist()])[age_of_group]

    rng = random.Random(seed)
    split_names = list(ratios)
    split_of_group = np.zeros(len(sizes), np.int64)
    for b in range(len(bin_names)):
        gids_in_bin = np.flatnonzero(group_bin == b)   # in group order
        order = list(range(len(gids_in_bin)))
        rng.shuffle(order)          # the permutation random.shuffle gives a list of this length
        placed, total = dict.fromkeys(ratios, 0), 0
        for g in gids_in_bin[order].tolist():
            size = int(sizes[g])
            total += size
            target = max(ratios, key=lambda s: ratios[s] * total - placed[s])
            placed[target] += size
            split_of_group[g] = split_names.index(target)

    out: dict[str, np.ndarray] = {}
    for n, name in enumerate(split_names):
        members = np.flatnonzero(split_of_group[group_of] == n)
        members = members[np.argsort(keys[members], kind="stable")]
        order = list(range(len(members)))
        random.Random(f"{seed}/{name}").shuffle(order)
        out[name] = members[order]
    return out


def shard_count(n: int, max_per_shard: int, min_shards: int) -> int:
    """Enough shards for `max_per_shard`, at least `min_shards` (so every rank x worker gets one),
    and never more shards than samples."""
    if n == 0:
        return 0
    return min(n, max(min_shards, -(-n // max_per_shard)))


def even_chunks(n: int, k: int) -> list[tuple[int, int]]:
    """k (start, stop) ranges covering range(n) whose sizes differ by at most one."""
    bounds, start = [], 0
    for i in range(k):
        stop = start + n // k + (1 if i < n % k else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
