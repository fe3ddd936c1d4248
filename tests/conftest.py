"""Shared fixtures: real UTKFace data, shard sets built once per session, CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "utkface"
SHARED = Path(os.environ.get("AGESCALE_SHARED_DATA", REPO.parent / "shared" / "data"))
AGESCALE = str(Path(sys.executable).parent / "agescale")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per worker (inherited by the processes a test starts): two workers then
    # fill the two cores without four OpenMP threads spinning against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args, check: bool = False, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `agescale` console script, as a user would."""
    proc = subprocess.run([AGESCALE, *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"agescale {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shared_utkface() -> Path:
    path = SHARED / "utkface"
    if not path.is_dir():
        pytest.skip(f"shared UTKFace data not found at {path} (set AGESCALE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def sample_jpegs() -> list[Path]:
    """Real face JPEGs shipped with the repo (for fixtures written in other datasets' formats)."""
    files = sorted(SAMPLE.glob("*.jpg"))
    assert len(files) >= 1000, "data/sample/utkface is missing from the checkout"
    return files


@pytest.fixture(scope="session")
def utk_shards(shared_utkface, tmp_path_factory) -> Path:
    """All 6,000 shared images sharded with the default splits (read-only for tests)."""
    out = tmp_path_factory.mktemp("utk") / "shards"
    run_cli("shard", "--dataset", "utkface", "--src", shared_utkface, "--out", out, check=True)
    return out


@pytest.fixture
def utk_shards_copy(utk_shards, tmp_path) -> Path:
    """A private copy that a test may damage."""
    dst = tmp_path / "shards"
    shutil.copytree(utk_shards, dst)
    return dst


@pytest.fixture(scope="session")
def batch64(utk_shards):
    """64 real faces from the real loader (DALI CPU, eval transform) at 64 px: the overfit tests' batch."""
    from data_pipeline.config import DataConfig
    from data_pipeline.loaders import create_loader

    cfg = DataConfig()
    cfg.loader.shards, cfg.loader.image_size, cfg.loader.batch_size = str(utk_shards), 64, 64
    b = next(iter(create_loader(cfg, "val")))
    assert b["valid"].all() and b["age"].std() > 10  # a real spread of ages
    return b


@pytest.fixture(scope="session")
def trained_run(utk_shards, tmp_path_factory) -> Path:
    """A tiny real run (ResNet-18 at 32 px, 8 steps) for the evaluation, export and serving tests."""
    from test_train import CONFIG, small

    run = tmp_path_factory.mktemp("serve") / "run"
    run_cli("train", CONFIG, *small(utk_shards, run, **{"train.max_steps": 8}), check=True)
    return run


@pytest.fixture(scope="session")
def bundle(trained_run, tmp_path_factory) -> Path:
    """Its export bundle, face detector included (read-only for tests)."""
    out = tmp_path_factory.mktemp("bundle") / "b"
    run_cli("export", trained_run, "--out", out, check=True)
    return out


# `make test` runs the suite on two pytest-xdist workers: most of a test's time is one process
# importing torch and DeepSpeed on one core, so two workers keep both cores busy. Each module
# runs on one worker (its module-scoped fixtures are built once), as with `--dist loadfile`,
# except that the modules that start a local Ray instance form one unit, scheduled first (the
# longest chain), so that no two Ray instances, each sized to the whole machine, run at once.
# Tests marked `serial` (wall-clock assertions) run afterwards, alone (Makefile).
# (A scheduler of our own because xdist 3.8's `loadgroup` marks do not take under pytest 9.2.)
RAY_MODULES = {"test_tune", "test_shard_ray", "test_service"}


def pytest_xdist_make_scheduler(config, log):
    from collections import OrderedDict

    from xdist.scheduler import LoadScopeScheduling

    class RayFirst(OrderedDict):
        def __setitem__(self, scope, tests):
            super().__setitem__(scope, tests)
            if scope == "ray":
                self.move_to_end(scope, last=False)

    class ModulesRayTogether(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.workqueue = RayFirst()

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "ray" if Path(module).stem in RAY_MODULES else module

    return ModulesRayTogether(config, log)
