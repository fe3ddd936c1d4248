"""Where `agescale shard`'s shard-writing tasks run, and how an interrupted run is resumed.

`data.shard.executor`:
  local  a process pool on this machine (`data.shard.workers` processes);
  ray    one Ray task per shard on whichever node has a free CPU (`data.shard.ray_address`, or a
         private local instance); the tasks read the sources and write the shards themselves,
         so sources and `--out` must be on a filesystem every node sees. A task whose worker dies
         is retried (`MAX_RETRIES`); the output is byte-identical to the local executor's.
Each finished shard leaves `<tar>.done.json`: the job's fingerprint (its samples' keys, labels,
inputs by path, size and mtime, and the settings), the shard's info, which samples it kept and
their inputs' sha256. `--resume` keeps a shard whose record matches the job and whose tar and
index still hash to the recorded sha256, and writes only the others. The records are removed
once the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from base.errors import UserError
from data_pipeline.config import ShardConfig
from data_pipeline.records import Rejected

DONE_SUFFIX = ".done.json"
MAX_RETRIES = 3
# Fault injection for the tests, "<shard file name>:<marker path>": the worker writing that shard
# dies (os._exit) half-way, once (while the marker file does not exist), the way an OOM kill or a
# lost node ends a task.
KILL_ENV = "AGESCALE_TEST_KILL_SHARD"


def done_path(tar: Path) -> Path:
    return tar.with_name(tar.name + DONE_SUFFIX)


def _identity(item: Path | bytes | None):
    """What stands for an input in a fingerprint: the content hash of bytes held in memory, the
    path, size and mtime of a file (as make and rsync judge a file changed; hashing every input
    up front would cost the parent a pass over all of them)."""
    if item is None or isinstance(item, bytes):
        return None if item is None else hashlib.sha256(item).hexdigest()
    try:
        st = os.stat(item)
    except OSError:
        return [str(item), None]
    return [str(item), st.st_size, st.st_mtime_ns]


def fingerprint(job, format_version: int) -> str:
    """What the shard's bytes depend on."""
    payload = [format_version, job.split, job.path.name, job.max_side, job.jpeg_quality,
               [[key, _identity(rec.image), rec.age, rec.gender, rec.race, rec.subject, _identity(rec.body)]
                for key, rec in job.members]]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()


def kill_point(job) -> Path | None:
    """The test hook's marker when this job is the one to die in, else None (read once per shard,
    not per sample)."""
    name, _, marker_path = os.environ.get(KILL_ENV, "").partition(":")
    return Path(marker_path) if marker_path and job.path.name == name else None


def die_once(marker: Path) -> None:
    if not marker.exists():
        marker.write_text("killed once by the test hook\n")
        os._exit(1)


def _sha(path: Path) -> str | None:
    from data_pipeline.shard import sha256_file

    return sha256_file(path) if path.is_file() else None


def write_recorded(job, format_version: int) -> tuple:
    """Write one shard, then its record (atomically: a record means a complete shard). Returns
    (info, kept keys, rejected, digests): labels and keys only, so no record crosses back."""
    from data_pipeline.shard import write_shard

    written = write_shard(job)
    result = (written.info, written.kept, [[r.source, r.input, r.reason] for r in written.rejected],
              written.digests)
    record = {"fingerprint": fingerprint(job, format_version), "info": result[0], "kept": result[1],
              "rejected": result[2], "digests": result[3]}
    tmp = done_path(job.path).with_suffix(".partial")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, done_path(job.path))
    return result


def _outcome(job, info, kept_keys, rejected, digests):
    """A ShardOutcome in the parent's terms: the kept samples as table indices (in the order the
    worker wrote them, which is the job's order) and their digests as raw bytes."""
    import numpy as np

    from data_pipeline.shard import ShardOutcome

    members = job.members
    kept = set(kept_keys)
    mask = np.array([members.keys[i].decode() in kept for i in members.indices.tolist()], bool)
    raw = np.frombuffer(b"".join(bytes.fromhex(d) for d in digests), np.uint8).reshape(-1, 32)
    return ShardOutcome(job, info, members.indices[mask],
                        [Rejected(*r) for r in rejected], raw)


def reuse(job, fp: str):
    """The outcome recorded for this job if its shard is still intact, else None."""
    try:
        record = json.loads(done_path(job.path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fp or "digests" not in record:
        return None
    info = record.get("info")
    if info is not None and (_sha(job.path) != info["sha256"] or _sha(job.path.with_suffix(".idx")) != info["index_sha256"]):
        return None
    return _outcome(job, info, record["kept"], record["rejected"], record["digests"])


# The local pool's jobs, inherited by its forked workers: a task is an index, so no record is
# pickled on the way out either (pickling 6,000 records both ways cost the parent ~0.06 s).
_TODO: list = []


def _write_nth(n: int) -> tuple:
    job, format_version = _TODO[n]
    return (n, *write_recorded(job, format_version))


def run_jobs(jobs: Sequence, format_version: int, cfg: ShardConfig, resume: bool,
             on_done: Callable[[object, bool], None]) -> None:
    """Run (or, with `resume`, re-use) every job; `on_done(outcome, reused)` for each."""
    todo = []
    for job in jobs:
        old = reuse(job, fingerprint(job, format_version)) if resume else None
        if old is not None:
            on_done(old, True)
        else:
            done_path(job.path).unlink(missing_ok=True)
            todo.append(job)
    # Largest shards first, so that no worker is left with a big one at the end.
    todo.sort(key=lambda job: -len(job.members))
    if not todo:
        return
    runner = _run_ray if cfg.executor == "ray" else _run_local
    for n, *result in runner(todo, format_version, cfg):
        on_done(_outcome(todo[n], *result), False)


def _run_local(todo, format_version: int, cfg: ShardConfig) -> Iterator:
    global _TODO
    _TODO = [(job, format_version) for job in todo]
    try:
        with mp.get_context("fork").Pool(min(len(todo), cfg.workers or os.cpu_count() or 1)) as pool:
            yield from pool.imap_unordered(_write_nth, range(len(todo)))
    finally:
        _TODO = []


def _run_ray(todo, format_version: int, cfg: ShardConfig) -> Iterator:
    import ray

    from cluster.ray_session import start_ray

    start_ray(cfg.ray_address, cfg.workers)
    try:
        # retry_exceptions=False: a task is retried when its worker dies, not for a Python error
        # (a full disk fails the same way again, and the error should reach the user at once)
        task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(write_recorded)
        pending = {task.remote(job, format_version): n for n, job in enumerate(todo)}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            n = pending.pop(ready)
            try:
                yield (n, *ray.get(ready))
            except ray.exceptions.WorkerCrashedError:
                raise UserError(f"{todo[n].path}: the task writing it died {MAX_RETRIES + 1} times; see Ray's logs "
                                "(out of memory?); start again with --resume to keep the shards already written") from None
    finally:
        ray.shutdown()
