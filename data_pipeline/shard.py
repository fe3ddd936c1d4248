"""`agescale shard`: dataset adapters → decode check → splits → WebDataset tars + DALI index
files + manifest.json.

Each sample in a tar has three components:
  <key>.jpg (or .png)  the original image bytes (re-encoded only for --max-side or odd formats)
  <key>.labels.f32     3 little-endian float32: age in years, gender (0 male, 1 female, -1 unknown),
                       race (UTKFace codes 0-4, -1 unknown); DALI reads it as FLOAT, no JSON needed
  <key>.json           every label and the provenance, for people and the PyTorch loader
  <key>.body.jpg       (optional, .body.png likewise) a second crop of the same person, e.g. the body
                       crop MiVOLO reads; the loaders return it as batch["body"] (zeros where absent)
The tars are byte-identical for the same inputs and seed (fixed mtime, owner and order).

Inputs with the same content (sha256 of the file bytes) are stored once, whichever dataset or
folder they came from: the first in --src order (then adapter order) is kept, the others are
listed under "duplicates" in the manifest and left out of whichever split they were assigned
to, so one image can never be in two splits. The workers hash each file from the bytes they
read for the decode check, so the de-duplication happens after the shards are written: the
few shards that held a later copy are written again without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.errors import UserError
from base.paths import out_dir
from data_pipeline.config import DataConfig
from data_pipeline.datasets import create_dataset
from data_pipeline.images import prepare_image
from data_pipeline.record_table import Members, RecordTable
from data_pipeline.records import GENDERS, RACES, FaceRecord, Rejected, age_bin, age_bin_names, check_age, sample_key
from data_pipeline.shard_exec import die_once, done_path, kill_point, run_jobs
from data_pipeline.split import assign_splits, even_chunks, shard_count
from data_pipeline.tarshard import ShardWriter

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
PARTIAL = ".partial"  # suffix of every file being written; renamed when complete
FORMAT_VERSION = 1
LABELS_EXT = "labels.f32"
BODY_PREFIX = "body."  # the optional second crop: <key>.body.jpg / <key>.body.png
LABEL_FORMAT = {
    "component": LABELS_EXT,
    "dtype": "float32 little-endian",
    "fields": ["age_years", "gender (0 male, 1 female, -1 unknown)", "race (0-4 UTKFace codes, -1 unknown)"],
}


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    # one read for a small file, blocks for a large one (shards and indexes when a resume checks them)
    with open(path, "rb") as f:
        data = f.read(block)
        h = hashlib.sha256(data)
        while len(data) == block:
            data = f.read(block)
            h.update(data)
    return h.hexdigest()


def load_manifest(root: Path) -> dict:
    """The manifest of a shard directory; UserError naming the file when it is missing or broken."""
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory")
    if not path.exists():
        raise UserError(f"{path}: missing (shard the data first: agescale shard ...)")
    try:
        manifest = json.loads(path.read_text())
        for split, info in manifest["splits"].items():
            for shard in info["shards"]:
                shard["tar"], shard["index"], shard["bytes"], shard["samples"], shard["sha256"]  # noqa: B018
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not an agescale manifest ({type(e).__name__}: {e})") from None
    return manifest


def label_vector(rec: FaceRecord) -> bytes:
    g = -1 if rec.gender is None else rec.gender
    r = -1 if rec.race is None else rec.race
    return np.array([rec.age, g, r], dtype="<f4").tobytes()


def _sharder_file(path: Path) -> bool:
    """A file `agescale shard` writes inside a split folder: <split>-NNNNNN.tar/.idx, or a
    .tar.partial left by an interrupted run."""
    return path.is_file() and re.fullmatch(
        re.escape(path.parent.name) + r"-\d{6}\.(tar|idx|tar\.partial|tar\.done\.json|tar\.done\.partial)",
        path.name) is not None


def _prepare_out(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Make `out` an empty place for a shard set. --overwrite deletes only what the sharder
    wrote: the manifest's split folders, manifest.json and config.yaml, and (even without a
    manifest, which an interrupted run never got to write) folders holding nothing but shard and
    .partial files, and manifest.json.partial / config.yaml.partial. Without a manifest it
    refuses when anything else is there; with one, other files are left alone."""
    out_dir(out)
    if resume:  # keep what is there: the shards' own records decide what is re-used (shard_exec.py)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace an earlier shard set")
        old = out / MANIFEST
        splits: list[str] = []
        if old.exists():
            try:
                splits = list(json.loads(old.read_text())["splits"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{old}: not an agescale manifest; refusing to delete {out}") from None
        files = {MANIFEST + PARTIAL, CONFIG + PARTIAL} | ({MANIFEST, CONFIG} if old.exists() else set())
        owned, other = [], []
        for p in sorted(out.iterdir()):
            mine = (p.name in splits or all(_sharder_file(f) for f in p.iterdir())) if p.is_dir() \
                else (p.is_file() and p.name in files)
            (owned if mine else other).append(p)
        if other and not old.exists():
            raise UserError(f"--out {out} is not empty and holds no {MANIFEST}; refusing to delete it "
                            f"({other[0].name} is not a file agescale shard writes)")
        for p in owned:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None


def _collect(sources: Sequence[tuple[str, Path]], cfg: DataConfig) -> tuple[RecordTable, list[Rejected], list[dict]]:
    """Labelled records (with the index of each one's (dataset, --src) pair), rejections, one
    stats entry per pair (a pair given twice gets two entries)."""
    table = RecordTable()
    rejected: list[Rejected] = []
    per_source: list[dict] = []
    for i, (name, src) in enumerate(sources):
        n_in = n_ok = 0
        for item in create_dataset(name, src, cfg.ingest):
            n_in += 1
            if isinstance(item, Rejected):
                rejected.append(item)
                continue
            why = check_age(item, cfg.labels)
            if why:
                rejected.append(Rejected(item.source, item.original_id, why))
                continue
            table.append(item, i)
            n_ok += 1
        per_source.append({"dataset": name, "src": str(src.resolve()), "inputs": n_in, "labels_ok": n_ok,
                           "duplicates": 0})
    return table, rejected, per_source


def input_name(rec: FaceRecord) -> str:
    return str(rec.image) if isinstance(rec.image, Path) else f"{rec.source}:{rec.original_id}"


def _duplicates(table: RecordTable, digests: np.ndarray, passed: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The later copies of each file content (table indices, ascending) and their manifest
    entries: of each sha256 the first record in table order (--src order, then adapter order)
    is kept. `digests[i]` (32 bytes) is the sha256 of record i's bytes where `passed[i]` (the
    decode check). Each entry also names its record's (dataset, --src) pair under "pair"."""
    candidates = np.flatnonzero(passed)
    words = digests[candidates].view(">u8")  # (n, 4): sorted as numbers, equal where the digests are
    by_digest = candidates[np.lexsort(words.T[::-1])]  # stable: equal digests stay in table order
    d = digests[by_digest]
    later = np.zeros(len(by_digest), bool)
    later[1:] = (d[1:] == d[:-1]).all(axis=1)
    if not later.any():
        return np.zeros(0, np.int64), []
    run_start = np.maximum.accumulate(np.where(later, 0, np.arange(len(by_digest))))
    kept_of = dict(zip(by_digest[later].tolist(), by_digest[run_start[later]].tolist()))
    dropped = np.array(sorted(kept_of))
    entries = []
    for i in dropped.tolist():
        rec, k = table.record(i), table.record(kept_of[i])
        differ = "" if (k.age, k.gender, k.race) == (rec.age, rec.gender, rec.race) else \
            f"; labels differ: kept age {k.age:g}, gender {k.gender}, race {k.race}"
        entries.append({"pair": table.pair[i], "source": input_name(rec), "dataset": rec.source,
                        "kept": input_name(k), "sha256": digests[i].tobytes().hex(),
                        "reason": f"same content sha256 as {input_name(k)}{differ}"})
    return dropped, entries


def _unique_keys(table: RecordTable) -> np.ndarray:
    """Each record's key (bytes, by table index): `sample_key`, with _2, _3, ... for the later of
    records whose keys collide, in (source, original id) order.
    Why two passes and no sort of all records: a sorted list of (source, id) tuples and a list of
    key objects cost the driver ~260 bytes per sample at its peak; the keys are computed twice
    (~1 us each) and land straight in one fixed-width array, and only colliding keys are sorted."""
    n = len(table)

    def natural():
        return (sample_key(table.source_name(i), table.original_id[i]).encode() for i in range(n))

    width = max(map(len, natural()), default=1)
    keys = np.fromiter(natural(), dtype=f"S{width}", count=n)
    ordered = np.sort(keys)
    collided = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(collided):
        return keys
    groups: dict[bytes, list[int]] = {k: [] for k in collided.tolist()}
    for i in np.flatnonzero(np.isin(keys, collided)).tolist():
        groups[keys[i]].append(i)
    renamed: dict[int, bytes] = {}
    for key, members in groups.items():
        members.sort(key=lambda i: (table.source_name(i), table.original_id[i]))  # stable: ties in table order
        renamed |= {i: key + f"_{n_th}".encode() for n_th, i in enumerate(members[1:], start=2)}
    keys = keys.astype(f"S{max(width, max(map(len, renamed.values())))}")
    for i, key in renamed.items():
        keys[i] = key
    return keys


def _stats(table: RecordTable, idx: np.ndarray, cfg: DataConfig) -> dict:
    # Vectorised over the table's columns, age bins looked up per distinct age, and the standard
    # deviation in floats: statistics.pstdev's exact fractions were a quarter of the sharder's
    # serial time (0.045 s of ~0.19 s per 6,000 images, on 2 cores).
    ages = table.numpy("age")[idx]
    n = len(ages)
    distinct, counts = np.unique(ages, return_counts=True)
    bins = Counter()
    for a, c in zip(distinct.tolist(), counts.tolist()):
        bins[age_bin(a, cfg.labels)] += c
    values = ages.tolist()
    mean = math.fsum(values) / n if n else 0.0
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in values) / n) if n else 0.0

    def counted(column: str, names: dict) -> dict:
        codes, c = np.unique(table.numpy(column)[idx], return_counts=True)
        return {names.get(k, "unknown"): v for k, v in zip(codes.tolist(), c.tolist())}

    src_codes, src_counts = np.unique(table.numpy("source")[idx], return_counts=True)
    return {
        "count": n,
        "age_bins": {b: bins.get(b, 0) for b in age_bin_names(cfg.labels)},
        "age": {"mean": round(mean, 4), "std": round(std, 4),
                "median": statistics.median(values), "min": min(values), "max": max(values)} if n else None,
        "gender": counted("gender", GENDERS),
        "race": counted("race", RACES),
        "sources": dict(sorted((table.sources[k], v) for k, v in zip(src_codes.tolist(), src_counts.tolist()))),
        "with_body": int(table.has_body()[idx].sum()),
    }


@dataclass(frozen=True)
class ShardJob:
    path: Path
    split: str
    members: Sequence[tuple[str, FaceRecord]]  # a Members view in the parent; a list in a Ray task
    max_side: int | None
    jpeg_quality: int


@dataclass(frozen=True)
class WrittenShard:
    """What a worker reports for one shard: labels and keys only, never records."""

    info: dict | None  # None: every image of the shard was bad, no file written
    kept: list[str]    # keys of the samples written
    rejected: list[Rejected]
    digests: list[str]  # sha256 (hex) of each kept sample's input bytes, in `kept` order


@dataclass(frozen=True)
class ShardOutcome:
    """A shard as the parent keeps it: table indices and raw digests, ~40 bytes per sample."""

    job: ShardJob
    info: dict | None
    kept: np.ndarray      # table indices of the samples written, in shard order
    rejected: list[Rejected]
    digests: np.ndarray   # (len(kept), 32) uint8: the sha256 of each one's input bytes


def write_shard(job: ShardJob) -> WrittenShard:
    """Decode-check and write one shard (runs in a worker process; one shard per task, so the
    parent only coordinates and nothing but labels crosses the process boundary)."""
    kept, rejected, digests = [], [], []
    kill_marker = kill_point(job)
    with ShardWriter(job.path) as writer:
        for key, rec in job.members:
            if kill_marker is not None and len(writer.keys) == 1:
                die_once(kill_marker)
            img = prepare_image(rec.image, job.max_side, job.jpeg_quality)
            if not img.ok:
                rejected.append(Rejected(rec.source, rec.original_id, img.reason))
                continue
            body = prepare_image(rec.body, job.max_side, job.jpeg_quality) if rec.body is not None else None
            if body is not None and not body.ok:
                rejected.append(Rejected(rec.source, rec.original_id, f"body crop {rec.body}: {body.reason}"))
                continue
            kept.append(key)
            digests.append(img.sha256)
            meta = {"key": key, "age": rec.age, "gender": rec.gender, "race": rec.race, "subject": rec.subject,
                    "source": rec.source, "original_id": rec.original_id, "split": job.split,
                    "width": img.width, "height": img.height}
            parts = {img.ext: img.data, LABELS_EXT: label_vector(rec)}
            if body is not None:
                parts[f"{BODY_PREFIX}{body.ext}"] = body.data
                meta["body"] = {"width": body.width, "height": body.height}
            parts["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
            writer.write(key, parts)
    if not writer.keys:  # leave no empty tar behind
        writer.tar_path.unlink()
        writer.idx_path.unlink()
    return WrittenShard(writer.info if writer.keys else None, kept, rejected, digests)


def shard_datasets(sources: Sequence[tuple[str, Path]], out: Path, cfg: DataConfig, *,
                   overwrite: bool = False, resume: bool = False, resolved_config: dict | None = None) -> dict:
    """Shard one or more (dataset name, source path) pairs into `out`; returns the manifest.
    See the module docstring."""
    sc = cfg.shard
    table, rejected, per_source = _collect(sources, cfg)
    for stats in per_source:
        if stats["labels_ok"] == 0:
            reasons = Counter(r.reason.split(":")[0] for r in rejected if r.source == stats["dataset"])
            why = f" ({stats['inputs']} inputs rejected; reasons: {dict(reasons.most_common(3))})" if stats["inputs"] else ""
            raise UserError(f"--src {stats['src']}: no usable {stats['dataset']} samples{why}")
    _prepare_out(out, overwrite, resume)
    keys = _unique_keys(table)
    # Splits are assigned from labels alone, before the decode check: a bad image never moves
    # another sample to a different split.
    by_split = assign_splits(keys, table, sc.splits, sc.seed, cfg.labels)
    empty = [name for name, members in by_split.items() if not len(members)]
    if empty:
        raise UserError(f"split(s) {', '.join(empty)} would get no samples out of {len(table)}; "
                        "use fewer splits (e.g. --splits test=1) or more data")
    jobs = []
    for split, members in by_split.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        k = shard_count(len(members), sc.max_samples_per_shard, sc.min_shards_per_split)
        jobs += [ShardJob(out / split / f"{split}-{i:06d}.tar", split, Members(table, keys, members[a:b]),
                          sc.max_side, sc.jpeg_quality)
                 for i, (a, b) in enumerate(even_chunks(len(members), k))]
    if resume:  # shard files of another layout (fewer shards, another split) are not this run's
        wanted = {j.path.name for j in jobs}
        for split_dir in (p for p in out.iterdir() if p.is_dir()):
            for f in split_dir.iterdir():
                if _sharder_file(f) and f.name.split(".")[0] + ".tar" not in wanted:
                    f.unlink()
    outcomes: dict[Path, ShardOutcome] = {}
    reused = 0
    with tqdm(total=len(table), desc="shard", unit="img", disable=None) as progress:
        def on_done(done: ShardOutcome, was_reused: bool) -> None:
            nonlocal reused
            outcomes[done.job.path] = done
            reused += was_reused
            progress.update(len(done.job.members))

        run_jobs(jobs, FORMAT_VERSION, sc, resume, on_done)
        # De-duplication by the digests the workers took; the shards holding a later copy of a
        # file are written again without it (none, when the inputs hold no duplicates).
        digests = np.zeros((len(table), 32), np.uint8)
        passed = np.zeros(len(table), bool)
        for done in outcomes.values():
            digests[done.kept], passed[done.kept] = done.digests, True
        dropped, duplicates = _duplicates(table, digests, passed)
        del digests, passed
        if len(dropped):
            again = {j.path: ShardJob(j.path, j.split, j.members.without(dropped), j.max_side, j.jpeg_quality)
                     for j in jobs if np.isin(j.members.indices, dropped).any()}
            progress.total += sum(len(j.members) for j in again.values())
            jobs = [again.get(j.path, j) for j in jobs]
            run_jobs(list(again.values()), FORMAT_VERSION, sc, False, on_done)
    for d in duplicates:
        per_source[d.pop("pair")]["duplicates"] += 1
    split_info: dict[str, dict] = {}
    sharded: list[np.ndarray] = []
    for split in by_split:
        done = [outcomes[j.path] for j in jobs if j.split == split]
        kept = np.concatenate([d.kept for d in done])
        rejected += [r for d in done for r in d.rejected]
        split_info[split] = {**_stats(table, kept, cfg), "shards": [d.info for d in done if d.info]}
        sharded.append(kept)
    all_sharded = np.concatenate(sharded)
    if not len(all_sharded):
        for split in by_split:
            shutil.rmtree(out / split, ignore_errors=True)
        raise UserError("no image could be decoded; nothing to shard")
    per_pair = np.bincount(table.numpy("pair")[all_sharded], minlength=len(per_source))
    for i, stats in enumerate(per_source):
        stats["sharded"] = int(per_pair[i])

    manifest = {
        "format_version": FORMAT_VERSION,
        "sources": per_source,
        "seed": sc.seed,
        "splits_requested": sc.splits,
        "label_format": LABEL_FORMAT,
        "shard_policy": {
            "max_samples_per_shard": sc.max_samples_per_shard,
            "min_shards_per_split": sc.min_shards_per_split,
            "rule": "shards = min(n, max(min_shards_per_split, ceil(n / max_samples_per_shard))); sizes differ "
                    "by <= 1 before undecodable images are dropped",
            "shards_per_split": {s: len(v["shards"]) for s, v in split_info.items()},
            "max_side": sc.max_side,
        },
        "total": _stats(table, all_sharded, cfg) | {"inputs": sum(s["inputs"] for s in per_source),
                                         "rejected": len(rejected), "duplicates": len(duplicates)},
        "splits": split_info,
        "rejected": [{"source": r.source, "input": r.input, "reason": r.reason}
                     for r in sorted(rejected, key=lambda r: (r.source, r.input))],
        "duplicates": duplicates,
    }
    if resolved_config is not None:  # written as .partial too, so an interrupted run leaves only owned names
        from base.config import save_yaml
        save_yaml(resolved_config, out / (CONFIG + PARTIAL))
        os.replace(out / (CONFIG + PARTIAL), out / CONFIG)
    tmp = out / (MANIFEST + PARTIAL)
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, out / MANIFEST)  # last: a shard set without a manifest is incomplete
    for job in jobs:  # the manifest now says what the records said
        done_path(job.path).unlink(missing_ok=True)
    if resume:
        tqdm.write(f"resume: {reused} of {len(jobs)} shards were already written and check out; kept")
    return manifest
