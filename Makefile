# The two set-up commands are `make demo` and `make test`; each builds .venv first when needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/agescale/torch_extensions
export RAY_AUTH_MODE ?= disabled

.PHONY: venv test test-fast test-heavy demo tune-demo slurm-up slurm-down bench clean shards-full

venv:
	@scripts/ensure_venv.sh

# Two pytest-xdist workers (tests/conftest.py says how tests are grouped), then the `serial`
# tests (wall-clock assertions) alone.
XDIST := -n 2
test: venv
	$(PY) -m pytest $(XDIST) -m "not heavy and not serial" --durations=20
	$(PY) -m pytest -m "serial and not heavy"

test-fast: venv
	$(PY) -m pytest $(XDIST) -m "not slow and not heavy"

# The transformer families' 64-image overfit tests (~1-3.5 min each on 2 cores).
test-heavy: venv
	$(PY) -m pytest -m heavy

# Shard the repo's sample, train a small model on the CPU (DALI CPU backend), test it.
demo: venv
	rm -rf runs/demo
	$(VENV)/bin/agescale shard --dataset utkface --src data/sample/utkface --out runs/demo/shards
	$(VENV)/bin/agescale verify runs/demo/shards
	$(VENV)/bin/agescale train configs/experiments/demo_cpu.yaml
	$(VENV)/bin/agescale export runs/demo --out runs/demo/bundle
	$(VENV)/bin/agescale predict runs/demo/bundle data/sample/utkface/26_1_0_20170103180946896.jpg.chip.jpg

# The full-data protocol: all 20,023 shared UTKFace images (utkface/ + utkface_extra/), split
# train/val/test 0.9/0.05/0.05 with seed 0 (~6 s on 2 cores). Recipes and sweeps train on it.
SHARED ?= ../shared/data
shards-full: venv
	rm -rf runs/shards/utk_full
	$(VENV)/bin/agescale shard --dataset utkface --src $(SHARED)/utkface --dataset utkface --src $(SHARED)/utkface_extra \
	  --out runs/shards/utk_full --splits train=0.9,val=0.05,test=0.05 --seed 0

# 4 Ray Tune trials (2 methods x 2 augmentation strengths) on the sample, ASHA; ~1.5 min on 2 cores.
tune-demo: venv
	test -f runs/demo/shards/manifest.json || $(VENV)/bin/agescale shard --dataset utkface --src data/sample/utkface --out runs/demo/shards
	rm -rf runs/tune-demo
	$(VENV)/bin/agescale tune configs/tune/demo.yaml --out runs/tune-demo

# A one-node SLURM cluster on this machine (root; installs slurm-wlm + munge if missing).
slurm-up:
	cluster/slurm/local_cluster.sh up

slurm-down:
	cluster/slurm/local_cluster.sh down

bench: venv
	$(VENV)/bin/agescale bench shard --out runs/bench/shard.json
	$(VENV)/bin/agescale bench loader --out runs/bench/loader.json
	$(VENV)/bin/agescale bench train --out runs/bench/train.json
	$(VENV)/bin/agescale bench predict runs/demo/bundle --out runs/bench/predict.json

clean:
	rm -rf runs .pytest_cache
