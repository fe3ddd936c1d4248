"""A watchdog for the local Ray instance an `agescale tune` or `agescale shard --executor ray`
driver starts.

Why: when the driver dies without `ray.shutdown()` (kill -9, the OOM killer), Ray's own
fate-sharing stops the raylet and GCS, but the dashboard and runtime-env agents the raylet
spawned are reparented to init and keep running (seen with Ray 2.x here: ~80 s, then left as
zombies). Ray has no option to tie them to the driver, so this process, started in its own
session, keeps a list of every descendant of the driver and kills the ones still alive (same
pid *and* start time, so a reused pid is never hit) as soon as the driver's pipe closes.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

POLL_S = 0.5
_watchdog: subprocess.Popen | None = None  # held for the driver's lifetime: its stdin is the pipe


def start() -> None:
    """Watch this process (the driver); idempotent."""
    global _watchdog
    if _watchdog is None or _watchdog.poll() is not None:
        _watchdog = subprocess.Popen([sys.executable, "-m", "cluster.ray_reaper", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)


def _watch(driver_pid: int) -> None:
    import psutil

    known: dict[int, float] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if readable and not os.read(sys.stdin.fileno(), 1):  # EOF: the driver is gone, however it ended
            break
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():  # the driver's child too
                    known.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
    procs = []
    for pid, started in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
