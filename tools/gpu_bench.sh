#!/usr/bin/env bash
# The performance table of one GPU in one run (issue 7): DeRIS-B/L train and inference, fp32 and
# bf16, and deformable attention alone; the DeRIS-B bf16 train step both with the repeated stacks
# scanned (model.scan_layers, the released configs) and looped (issue 14). At most 560 s of entries, each with its own time
# limit so one slow compile cannot eat the rest; parameters are random, made on the device.
# Writes to $OUT (default bench_out/):
#   device.txt    nvidia-smi name, memory, driver; jax version and devices
#   NAME.json     bench.py rows (see bench.py), NAME.log its output, status.txt exit codes
# The GPU image has jax, flax, optax and orbax but not ml_collections: carry its wheels in .whl/
# (python3 -m pip download --no-deps --only-binary=:all: ... -d .whl ml_collections==1.1.0
# absl-py), they are installed into /tmp/site first. TensorFlow is not needed.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$OUT/device.txt" 2>&1
PEAK=${PEAK_TFLOPS:-989}  # H100 SXM bf16 dense, nominal (a matmul measured ~800 here)

run() {  # run NAME LIMIT_SECONDS bench.py-arguments...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" python3 bench.py "$@" --peak_tflops "$PEAK" --json "$OUT/$name.json" \
      > "$OUT/$name.log" 2>&1
  echo "$name rc=$? seconds=$((SECONDS - t0))" >> "$OUT/status.txt"
}

run deform_fp32 25 --mode deform --batch 16 --steps 20
run deform_bf16 25 --mode deform --batch 16 --steps 20 --dtype bfloat16
run b_train_bf16 100 --mode train --config configs/deris_b_refcoco.py --batch 16 --dtype bfloat16
run b_train_bf16_loop 90 --mode train --config configs/deris_b_refcoco.py --batch 16 \
    --dtype bfloat16 --config.model.scan_layers=False
run b_train_fp32 70 --mode train --config configs/deris_b_refcoco.py --batch 16
run l_train_bf16 150 --mode train --config configs/deris_l_refcoco.py --batch 16 --dtype bfloat16 \
    --config.model.remat=True --max_batch
run b_infer_bf16 50 --config configs/deris_b_refcoco.py --batch 1,64 --dtype bfloat16
run l_infer_bf16 50 --config configs/deris_l_refcoco.py --batch 1,64 --dtype bfloat16
cat "$OUT/status.txt"
