#!/usr/bin/env bash
# The GPU performance table (issue 7; scanned vs looped stacks, issue 14) in parts that each fit
# one 15-minute GPU lease:  tools/gpu_bench.sh PART   (PART = 1, 2, 3 or 4; 1 by default)
#   1  deformable attention alone (fp32, bf16); DeRIS-B bf16 forward at batch 1 and 64; the
#      DeRIS-B bf16 train step at batch 16 with the stacks scanned (the released configs)
#   2  the same train step with the stacks looped (model.scan_layers=False); DeRIS-L bf16
#      forward at batch 1 and 64
#   3  DeRIS-L bf16 train step at batch 16 as released (no remat); DeRIS-B fp32 (default
#      precision) train step
#   4  the largest DeRIS-L bf16 batch that fits with remat (--max_batch: several more compiles;
#      the measured row is written first, so a search cut short keeps it)
# Why parts: compiling is most of each entry. Measured on an H200 (2026-12-04, jax 0.11.2), as
# whole entries: part 1 took 342 s (the DeRIS-B bf16 train step compiled in 153 s, its forward
# in 55 s at batch 1 and 75 s at batch 64); the DeRIS-L bf16 train step 243 s (194 s compile),
# its batch-1 forward 61 s. Each part has at most 540 s of entries, each entry its own time
# limit; parameters are random (drawn on the host), and each entry first counts the model's
# FLOPs on the host (the program looped, lowered, not compiled: 5-30 s).
# Device time is scarce: the script stops at once (exit 3, the log's end printed) when the code
# cannot import or a canary entry fails for a reason other than its time limit, so a broken
# run costs seconds, not the lease. bench.py's progress lines (stderr, in NAME.log) say where
# an entry cut short by its limit spent its time.
# Writes to $RESULTS (default bench_out/):
#   device.txt    nvidia-smi name, memory, driver; jax, flax, optax versions and devices
#   NAME.json     bench.py rows (see bench.py), NAME.log its output, status.txt exit codes
# and prints each entry's rows as it ends. With $ARCHIVE set (the device tool brings back at most
# 8 files: ARCHIVE=$OUT/gpu_bench.tgz), RESULTS is packed there after every entry, so a run cut
# short still brings back what it measured.
# The GPU image has jax, flax, optax and orbax but not ml_collections: carry its wheel in .whl/
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
# ml_collections==1.1.0), it is installed into /tmp/site first. TensorFlow is not needed.
set -u
PART=${1:-1}
case $PART in
  1|2|3|4) ;;
  *) echo "gpu_bench.sh: unknown part '$PART' (1, 2, 3 or 4)" >&2; exit 2 ;;
esac
OUT=${RESULTS:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1
if ! python3 -c "import bench" > "$OUT/import.log" 2>&1; then
  cat "$OUT/device.txt" "$OUT/import.log"
  exit 3
fi
PEAK=${PEAK_TFLOPS:-989}  # H100/H200 SXM bf16 dense, nominal (a matmul measured ~790 on an H200)

run() {  # run NAME LIMIT_SECONDS bench.py-arguments...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout "$limit" python3 bench.py "$@" --peak_tflops "$PEAK" --json "$OUT/$name.json" \
      > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$OUT/status.txt"
  echo "== $name rc=$rc seconds=$((SECONDS - t0))"
  grep -E "^(device:|mode=)" "$OUT/$name.log"
  if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" -C "$OUT" .; fi
  return $rc
}

canary() {  # canary NAME LIMIT_SECONDS ...: as run, but a failure other than the limit stops all
  run "$@"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    cat "$OUT/device.txt" "$OUT/status.txt"
    tail -n 40 "$OUT/$1.log"
    exit 3
  fi
}

case $PART in
  1)
    canary deform_fp32 20 --mode deform --batch 16 --steps 20
    run deform_bf16 20 --mode deform --batch 16 --steps 20 --dtype bfloat16
    canary b_infer_bf16 175 --config configs/deris_b_refcoco.py --batch 1,64 --dtype bfloat16
    run b_train_bf16 300 --mode train --config configs/deris_b_refcoco.py --batch 16 \
        --dtype bfloat16
    ;;
  2)
    canary b_train_bf16_loop 320 --mode train --config configs/deris_b_refcoco.py --batch 16 \
        --dtype bfloat16 --config.model.scan_layers=False
    run l_infer_bf16 200 --config configs/deris_l_refcoco.py --batch 1,64 --dtype bfloat16
    ;;
  3)
    canary l_train_bf16 300 --mode train --config configs/deris_l_refcoco.py --batch 16 \
        --dtype bfloat16
    run b_train_fp32 230 --mode train --config configs/deris_b_refcoco.py --batch 16
    ;;
  4)
    canary l_train_bf16_remat_max 520 --mode train --config configs/deris_l_refcoco.py \
        --batch 16 --dtype bfloat16 --config.model.remat=True --max_batch
    ;;
esac
cat "$OUT/device.txt" "$OUT/status.txt"
