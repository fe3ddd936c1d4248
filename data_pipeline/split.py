"""Deterministic train/val/test assignment: subject-disjoint, stratified by age bin.

Samples of one subject form one group (a sample without a subject id is its own group). Groups
are binned by their median age; inside each bin they are shuffled with the seed and dealt, one
at a time, to the split furthest below its share of that bin. The result depends only on the
records (sorted by key first), the ratios and the seed, never on file-system order.
"""

from __future__ import annotations

import random
import statistics
from array import array
from collections.abc import Iterator

import numpy as np

from data_pipeline.config import LabelConfig
from data_pipeline.record_table import RecordTable
from data_pipeline.records import age_bin, age_bin_names


def _permutation(n: int, rng: random.Random) -> np.ndarray:
    """The permutation `rng.shuffle(list(range(n)))` gives, held as 8-byte ints: a list of Python
    ints costs ~36 bytes per sample at 500k samples, and these orders are part of the split."""
    order = array("q", range(n))
    rng.shuffle(order)  # any mutable sequence: the same swaps, so the same permutation
    return np.frombuffer(order, np.int64) if n else np.zeros(0, np.int64)


def _as_ints(a: np.ndarray, block: int = 1 << 16) -> Iterator[int]:
    """The array's items as Python ints, a block at a time (`tolist()` of it all at once would
    hold one Python int per sample)."""
    for start in range(0, len(a), block):
        yield from a[start:start + block].tolist()


def _group_index(groups: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """(each sample's group number in sorted group order, each group's size): what
    `np.unique(groups, return_inverse=True, return_counts=True)` gives. Without subjects every
    group is one sample's (unique) key, and its rank by argsort gives the same numbers in ~3x
    less peak memory (np.unique holds ~134 bytes per sample at 31-byte keys)."""
    perm = np.argsort(groups, kind="stable")
    for start in range(0, max(len(perm) - 1, 0), block):  # blockwise: no second copy of the keys
        run = groups[perm[start:start + block + 1]]
        if (run[1:] == run[:-1]).any():
            _, group_of, sizes = np.unique(groups, return_inverse=True, return_counts=True)
            return group_of, sizes
    group_of = np.empty(len(perm), np.int64)
    group_of[perm] = np.arange(len(perm))
    return group_of, np.ones(len(perm), np.int64)


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
    group_of, sizes = _group_index(group_ids(keys, table))
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
        order = _permutation(len(gids_in_bin), rng)
        placed, total = dict.fromkeys(ratios, 0), 0
        for g in _as_ints(gids_in_bin[order]):
            size = int(sizes[g])
            total += size
            target = max(ratios, key=lambda s: ratios[s] * total - placed[s])
            placed[target] += size
            split_of_group[g] = split_names.index(target)

    out: dict[str, np.ndarray] = {}
    for n, name in enumerate(split_names):
        members = np.flatnonzero(split_of_group[group_of] == n)
        members = members[np.argsort(keys[members], kind="stable")]
        out[name] = members[_permutation(len(members), random.Random(f"{seed}/{name}"))]
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
