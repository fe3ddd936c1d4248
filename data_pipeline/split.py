"""Deterministic train/val/test assignment: subject-disjoint, stratified by age bin.

Samples of one subject form one group (a sample without a subject id is its own group). Groups
are binned by their median age; inside each bin they are shuffled with the seed and dealt, one
at a time, to the split furthest below its share of that bin. The result depends only on the
records (sorted by key first), the ratios and the seed, never on file-system order.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Sequence

from data_pipeline.config import LabelConfig
from data_pipeline.records import FaceRecord, age_bin, age_bin_names


def assign_splits(items: Sequence[tuple[str, FaceRecord]], ratios: dict[str, float], seed: int,
                  labels: LabelConfig) -> dict[str, list[tuple[str, FaceRecord]]]:
    """Map split name → (key, record) list, each list shuffled with the seed."""
    groups: dict[str, list[tuple[str, FaceRecord]]] = defaultdict(list)
    for key, rec in sorted(items, key=lambda kv: kv[0]):
        groups[f"{rec.source}/subject/{rec.subject}" if rec.subject else key].append((key, rec))

    by_bin: dict[str, list[str]] = defaultdict(list)
    for gid in sorted(groups):
        group = groups[gid]  # most groups are one face (no subject ids): its age is the median
        by_bin[age_bin(group[0][1].age if len(group) == 1 else statistics.median(r.age for _, r in group),
                       labels)].append(gid)

    rng = random.Random(seed)
    out: dict[str, list[tuple[str, FaceRecord]]] = {name: [] for name in ratios}
    for bin_name in age_bin_names(labels):
        gids = by_bin.get(bin_name, [])
        rng.shuffle(gids)
        placed, total = dict.fromkeys(ratios, 0), 0
        for gid in gids:
            size = len(groups[gid])
            total += size
            target = max(ratios, key=lambda s: ratios[s] * total - placed[s])
            placed[target] += size
            out[target].extend(groups[gid])

    for name, members in out.items():
        members.sort(key=lambda kv: kv[0])
        random.Random(f"{seed}/{name}").shuffle(members)
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
