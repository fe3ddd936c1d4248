"""Joining or starting Ray for `agescale tune` and `agescale shard --executor ray`.

`address=None` always starts a new private local instance (never a cluster left running by
others); a watchdog (`ray_reaper.py`) stops its processes if the driver dies without shutting it
down. An address ('auto' or host:port) joins an existing cluster (`cluster/ray/cluster.yaml`).
"""

from __future__ import annotations

import os


def ray_env() -> None:
    """Ray 2.60 writes an auth token under ~ unless auth is off, and reports usage over the
    network unless told not to; a local instance needs neither."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune warns when trials report checkpoints often; ours do once per validation, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    ray_env()
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    from cluster import ray_reaper

    ray_reaper.start()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="WARNING")
