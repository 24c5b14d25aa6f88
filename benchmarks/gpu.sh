#!/usr/bin/env bash
# The GPU benchmark as one prepared script under a 5-minute guard (bench-gpu.json is rewritten after
# each model, so a run cut short keeps what it measured).
# UNet-R50 and TransUNet at 224x224, batch 64, bf16: ours (also with grad_checkpointing) against
# the straightforward implementation, MFU against the measured bf16 matmul ceiling, fine-tuning
# and evaluation (on 512x1024 images), and the data pipeline (folders, tar shards, shards decoded on the
# GPU) on 1 and 16 workers. Writes
# bench-gpu.json into $OUT (or here) and prints the table.
#   bash benchmarks/gpu.sh                      # on a GPU machine, from anywhere
#   DEVICE=cpu BENCH_ARGS="--size 64 ..." bash benchmarks/gpu.sh   # the same script, tried on a CPU
# BENCH_ARGS come last, so they override any setting below.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-.}/bench-gpu.json"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout "${BENCH_TIMEOUT:-300}" "$PYTHON" benchmarks/bench.py --device "${DEVICE:-cuda}" --batch 64 --steps 20 --warmup 5 \
    --finetune-steps 10 --checkpointing --eval-size 512 --photos 200 --data-workers 1 16 --out "$out" ${BENCH_ARGS:-}
