#!/usr/bin/env bash
# The GPU path in one command: everything that needs CUDA and cannot run on the 2-core CPU
# machine, each step timed, into one report ($OUT/gpu_check.json and gpu_check.md).
#   scripts/gpu_check.sh                 # OUT=runs/gpu_check, shards of ../shared/data/utkface
#   OUT=/tmp/g SHARED=/data scripts/gpu_check.sh
# Steps: the `gpu`/`multigpu` tests; 200-step bf16 trainings (DALI `mixed` decode + DALI
# augmentation operators, nccl) with ZeRO 0 and ZeRO 2 (on every visible GPU, via torchrun);
# `bench loader --gpu` (DALI mixed decode + its augmentation operators on CUDA, against the
# CPU rows, in one run); `bench train` (CPU trainer overhead on this host, for the record); `bench
# predict` on a bundle exported from the ZeRO-0 run (the ONNX Runtime providers are listed).
# Without CUDA it stops at once with one line and exit code 3.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi missing or sees no device); run it on a GPU machine" >&2
  exit 3
fi
VENV=${VENV:-.venv}
PY=$VENV/bin/python
AG=$VENV/bin/agescale
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: nvidia-smi sees a GPU but torch.cuda.is_available() is False (driver / CUDA build mismatch)" >&2
  exit 3
fi
OUT=${OUT:-runs/gpu_check}
SHARED=${SHARED:-../shared/data}
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

step() {  # step NAME CMD...: run, time, keep the log, record rc
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$EPOCHREALTIME
  printf '{"step": "%s", "rc": %d, "seconds": %.1f, "log": "%s"}\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
    "$OUT/$name.log" >> "$STEPS"
  echo "gpu_check: $name: exit $rc ($(tail -n 1 "$OUT/$name.log" | cut -c1-120))"
}

SHARDS="$OUT/shards"
[ -f "$SHARDS/manifest.json" ] || step shard "$AG" shard --dataset utkface --src "$SHARED/utkface" --out "$SHARDS"
step tests_gpu "$PY" -m pytest -m "gpu or multigpu" -q -rA --junitxml "$OUT/tests_gpu.xml"
TRAIN=(configs/experiments/utkface_cpu.yaml "data.loader.shards=$SHARDS" train.device=gpu data.loader.device=gpu
       train.precision=bf16 train.max_steps=200 train.time_budget_min=null train.val_every_steps=100 train.ckpt_every_steps=100
       data.loader.image_size=112 data.loader.batch_size=64)
step train_zero0 "$VENV/bin/torchrun" --nproc-per-node "$GPUS" --no-python "$AG" train "${TRAIN[@]}" \
  train.zero_stage=0 "train.run_dir=$OUT/train_zero0" --overwrite
step train_zero2 "$VENV/bin/torchrun" --nproc-per-node "$GPUS" --no-python "$AG" train "${TRAIN[@]}" \
  train.zero_stage=2 "train.run_dir=$OUT/train_zero2" --overwrite
step bench_loader "$AG" bench loader --gpu --src "$SHARED/utkface" --shards "$SHARDS" --out "$OUT/bench_loader.json"
step bench_train "$AG" bench train --out "$OUT/bench_train.json"
step export "$AG" export "$OUT/train_zero0" --out "$OUT/bundle"
step bench_predict "$AG" bench predict "$OUT/bundle" --out "$OUT/bench_predict.json"

"$PY" - "$OUT" "$GPUS" <<'PY'
import json, subprocess, sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), int(sys.argv[2])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
def load(p):
    p = out / p
    return json.loads(p.read_text()) if p.exists() else None
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
except Exception as e:  # report, do not fail the report
    providers = [f"onnxruntime unavailable: {e}"]
report = {
    "gpus": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip().splitlines(),
    "steps": steps,
    "train_zero0": load("train_zero0/summary.json"), "train_zero2": load("train_zero2/summary.json"),
    "bench_loader": load("bench_loader.json"), "bench_train": load("bench_train.json"),
    "bench_predict": load("bench_predict.json"), "onnxruntime_providers": providers,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
md = ["# agescale GPU check", "", f"GPUs ({gpus}): " + "; ".join(report["gpus"]), "",
      "| step | exit | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
for z in ("train_zero0", "train_zero2"):
    s = report[z]
    if s and "test" in s:
        md.append(f"\n{z}: {s['steps']} steps, world size {s['world_size']}, test MAE {s['test']['mae']:.2f}")
md.append(f"\nONNX Runtime providers: {', '.join(providers)}")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
PY
! grep -q '"rc": [1-9]' "$STEPS"
