#!/usr/bin/env bash
# Every GPU figure of the foundation, pseudo-label and performance work, from one command on one CUDA machine.
# Each step has its own time limit, so a slow step cannot starve the others; the whole suite ends within 9 minutes.
#
#   bash benchmarks/gpu_suite.sh          # results in benchmarks/results/ (copied to $OUT too when it is set)
#   COMPILE=1 bash benchmarks/gpu_suite.sh   # also the torch.compile variants of the training step (+2 min)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

step() {
    local limit=$1
    shift
    echo
    echo "=== [limit ${limit} s] $*"
    timeout "$limit" "$@" || echo "!!! exit status $?: $*"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

# SAM kernels: blockwise vs full at N = 8192 and 32768 (targets printed as PASS/FAIL).
step 80 python benchmarks/sam.py --device cuda
# Training step at 1024x512, plain vs Lightning, fp32 vs bf16, SAM share, stage 0/1 steps.
step 140 python benchmarks/train_step.py --device cuda
# The steps of the paper's GTA5 protocol (1280x720 sources) for the projected wall time.
step 80 python benchmarks/train_step.py --device cuda --source-size 1280 720 \
    --variants lightning-bf16-stage0 lightning-bf16-stage1 lightning-bf16
# A 2048x1024 step (N = 32768) with the SAM loss.
step 70 python benchmarks/train_step.py --device cuda --size 2048 1024 --variants lightning-bf16 plain-bf16
# A whole pseudo-label generation against plain inference, DeepLabV2-ResNet101 at 1024x512, bf16.
step 150 python benchmarks/generation.py --backbone resnet101 --size 1024 512 --batch-size 8 --precision bf16 \
    --num-workers 8 --image-counts 128 256
if [ "${COMPILE:-0}" = 1 ]; then
    step 150 python benchmarks/train_step.py --device cuda --variants plain-bf16-compile lightning-bf16-compile
fi

if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/* "$OUT"/
fi
