"""`agescale verify DIR`: re-read every shard and index file against the manifest.

Checks, per shard: the tar and its index exist, their sizes and sha256 match the manifest, the
tar reads to its end, holds the expected number of samples with an image, a 12-byte label
vector and JSON each, and the DALI index lists the same samples at the right offsets.
Returns the list of problems, each naming the file.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from pathlib import Path

from data_pipeline.shard import LABELS_EXT, load_manifest, sha256_file
from data_pipeline.tarshard import read_index

IMAGE_EXTS = {"jpg", "png"}


def _tar_samples(tar_path: Path) -> "OrderedDict[str, dict[str, tuple[int, int]]]":
    """key → {extension: (data offset, size)}, reading the whole archive."""
    samples: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    with tarfile.open(tar_path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
            data = tf.extractfile(m).read()  # reads through: a truncated member raises here
            if len(data) != m.size:
                raise tarfile.ReadError(f"member {m.name} is truncated")
            if ext == LABELS_EXT and len(data) != 12:
                raise tarfile.ReadError(f"{m.name}: label vector has {len(data)} bytes, expected 12")
    return samples


def verify_shards(root: Path) -> tuple[list[str], int]:
    """(problems, number of shards checked)."""
    manifest = load_manifest(root)
    problems: list[str] = []
    listed: set[Path] = set()
    n = 0
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            n += 1
            tar_path, idx_path = root / split / shard["tar"], root / split / shard["index"]
            listed |= {tar_path, idx_path}
            name = f"{split}/{shard['tar']}"
            if not tar_path.exists():
                problems.append(f"{name}: missing")
                continue
            if tar_path.stat().st_size != shard["bytes"]:
                problems.append(f"{name}: size {tar_path.stat().st_size} != {shard['bytes']} in manifest (truncated or altered)")
            elif sha256_file(tar_path) != shard["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (altered)")
            try:
                samples = _tar_samples(tar_path)
            except (tarfile.TarError, OSError) as e:
                problems.append(f"{name}: unreadable tar ({e})")
                continue
            if len(samples) != shard["samples"]:
                problems.append(f"{name}: {len(samples)} samples, manifest says {shard['samples']}")
            for key, comps in samples.items():
                if not (IMAGE_EXTS & comps.keys()) or LABELS_EXT not in comps or "json" not in comps:
                    problems.append(f"{name}: sample {key} lacks image, {LABELS_EXT} or json ({sorted(comps)})")
                    break
            iname = f"{split}/{shard['index']}"
            if not idx_path.exists():
                problems.append(f"{iname}: missing DALI index")
                continue
            if sha256_file(idx_path) != shard["index_sha256"]:
                problems.append(f"{iname}: sha256 differs from the manifest (altered)")
            try:
                entries = [comps for _, comps in read_index(idx_path)]
            except ValueError as e:
                problems.append(f"{iname}: malformed index ({e})")
                continue
            if entries != list(samples.values()):
                problems.append(f"{iname}: offsets or sizes do not match {shard['tar']}")
    for split in manifest["splits"]:
        for extra in sorted((root / split).glob("*")) if (root / split).is_dir() else []:
            if extra not in listed:
                problems.append(f"{split}/{extra.name}: not in the manifest")
    return problems, n
