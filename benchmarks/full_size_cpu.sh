#!/usr/bin/env bash
# Full-size DeRIS-B and DeRIS-L on the CPU: real train steps, forward latency, and XLA's memory
# estimate at the released per-device batches (BENCHMARKS.md "Full size on the CPU").
#
#   benchmarks/full_size_cpu.sh [LOG]        (default /tmp/full_size_cpu.log; ~40 min on 2 cores)
#
# 1. one train step at batch 1, executed (bench.py --mode train), DeRIS-B and DeRIS-L (remat);
# 2. the DeRIS-B forward at batch 1 (what a demo user on a laptop waits for);
# 3. the train-step memory XLA's buffer assignment needs per device (train.py --dry_run, no
#    parameter allocated) at the released per-GPU batch: 16 on RefCOCO, 1 on gRefCOCO, in
#    float32 and bfloat16, with and without remat. On the CPU this is an estimate standing in
#    for a GPU's: the CPU compiler fuses and schedules differently.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/full_size_cpu.log}
: > "$LOG"
run() { echo "\$ $*" | tee -a "$LOG"; /usr/bin/time -f "wall %e s, peak RSS %M KB" "$@" 2>&1 | tee -a "$LOG"; }

# official_world_size=1: the official loss normaliser needs B % 4 == 0. DeRIS-L runs with
# remat: without it the step needs more than a 24 GiB machine has (killed at 24.3 GB peak RSS;
# with remat 22.8 GiB).
for V in b l; do
  REMAT=$([ "$V" = l ] && echo True || echo False)
  run python bench.py --mode train --config "configs/deris_${V}_refcoco.py" --batch 1 --steps 2 --warmup 1 \
      --config.data.official_world_size=1 --config.model.remat=$REMAT
done
run python bench.py --config configs/deris_b_refcoco.py --batch 1 --steps 5 --warmup 1

for V in b l; do
  for DTYPE in float32 bfloat16; do
    for REMAT in False True; do
      run python train.py --config "configs/deris_${V}_refcoco.py" --dry_run \
          --config.data.batch_size=16 --config.data.official_world_size=1 \
          --config.model.dtype=$DTYPE --config.model.remat=$REMAT
      run python train.py --config "configs/deris_${V}_grefcoco.py" --dry_run \
          --config.data.batch_size=1 --config.data.official_world_size=1 \
          --config.model.dtype=$DTYPE --config.model.remat=$REMAT
    done
  done
done
