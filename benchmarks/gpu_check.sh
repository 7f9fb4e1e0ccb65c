#!/usr/bin/env bash
# The GPU measurements of docs/PERFORMANCE.md in one go, for a session that is lent a GPU machine (docs/PERFORMANCE.md, "GPU").
#
#   here, once:  bash benchmarks/gpu_prepare.sh        # wheels + test images -> benchmarks/results/gpu/
#   device:      run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/results/gpu"], timeout_s=600)
#   smoke here:  QUICK=1 DEVICE=cpu OUT=/tmp/gpu-smoke bash benchmarks/gpu_check.sh   (tiny sizes, no GPU)
#
# Writes to $OUT (at most 8 files come back): log.txt, engine_small.json (shipped 32 px model),
# engine_256.json (random weights, google/ddpm-celebahq-256's exact architecture), precision.json
# (bf16 / fp16 vs fp32 scores), service.json (batched vs max-batch-1 service, engine reference),
# engine_compile.json (torch.compile beside eager), model_costs.json (docs/MODELS.md: DiffPath's CelebA-32 model
# and google/ddpm-celebahq-256, random weights, imported-folder layout: images/s, memory per image, FLOPs).
# Each step has its own time limit, so one that hangs cannot eat the others' device time.
set -u
cd "$(dirname "$0")/.."
G=benchmarks/results/gpu
OUT=${OUT:-$G/out}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1

if [ -d "$G/wheels" ] && [ "$QUICK" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$G"/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
DATA="$G/data"
[ -d "$DATA/celeba" ] || DATA=../shared/data

step() {  # step NAME SECONDS CMD...: run with a time limit, everything into the one log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name rc=$? ($(date +%T))" | tee -a "$LOG"
}

{ nvidia-smi || true; $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; } >>"$LOG" 2>&1
if [ "$QUICK" = 1 ]; then
    $PY -c "import sys; sys.path.insert(0, '.'); from tests.helpers import make_tiny_model as m; \
from pathlib import Path; m(Path('/tmp/gpu-check-model'))" || exit 1
    SMALL=(--model /tmp/gpu-check-model --batch-sizes 1 2 --rounds 1 --min-images 2 --naive-images 2
           --steps 2 --variants --variant-batches 2)
    BIG=("${SMALL[@]}")
    COMPILE=(--model /tmp/gpu-check-model --batch-sizes 2 --rounds 1 --min-images 2 --naive-images 2 --steps 2
             --variants --variant-batches 2 --compile)
    PREC=(--model /tmp/gpu-check-model --reference 40 --test 10)
    COSTS=(--quick)
    SERVICE=(-c 1 2 -n 4 --env DDM_TORCH_THREADS=1)
else
    SMALL=(--batch-sizes 1 8 32 128 512 2048 8192 --rounds 3 --min-images 64 --naive-images 8
           --variants --variant-batches 1 128 2048)
    $PY benchmarks/random_model.py benchmarks/configs/ddpm-celebahq-256 /tmp/celebahq256 >>"$LOG" 2>&1
    BIG=(--model /tmp/celebahq256 --batch-sizes 1 8 32 128 512 --rounds 2 --min-images 32
         --naive-images 2 --variants --variant-batches 1 32)
    COMPILE=(--batch-sizes 1 128 --rounds 2 --min-images 64 --naive-images 2 --variants --variant-batches 1 128
             --compile)
    PREC=(--reference 200 --test 100)
    COSTS=(--models diffpath-celeba32 celebahq-256 --batch-sizes 1 16 64 --rounds 2)
    SERVICE=(-c 1 8 16 32 64 -n 64 --per-client 4)
fi

# Typical total on an H200: 5-6 minutes; the limits add up to 560 s, the order is by importance (each step
# writes its JSON when it ends, so a cut-off run still returns the earlier ones).
# 0. no host/device sync inside the trajectory loop (torch.cuda.set_sync_debug_mode("error")).
step sync_check 40 $PY benchmarks/sync_check.py
# 0b. what the pretrained models cost on a GPU (docs/MODELS.md): DiffPath's 52.5 M CelebA-32 model (learned
#     sigma, t*1000/4000, as imported) and the 114 M 256 px celebahq UNet, K = 10, default precision.
step model_costs 60 $PY benchmarks/model_costs.py --device "$DEVICE" "${COSTS[@]}" --json "$OUT/model_costs.json"
# 1. shipped model: default precision (bf16 autocast on CUDA) by batch size up to the memory limit, the
#    naive peer, and fp32 / fp16 / channels_last beside the default.
step engine_small 130 $PY benchmarks/engine_bench.py --device "$DEVICE" --images "$DATA/celeba" "${SMALL[@]}" \
    --json "$OUT/engine_small.json"
# 2. a 114 M-parameter 256 px UNet (ddpm-celebahq-256's config, random weights): same cost as the real one.
step engine_256 110 $PY benchmarks/engine_bench.py --device "$DEVICE" --images "$DATA/celeba" "${BIG[@]}" \
    --json "$OUT/engine_256.json"
# 3. what bf16 / fp16 autocast does to features, scores, verdicts and AUROC (shipped model, real weights).
step precision 40 $PY benchmarks/precision_check.py --device "$DEVICE" --contenders torch:bfloat16 torch:float16 \
    --normal "$DATA/celeba" --ood "$DATA/cifar10" "${PREC[@]}" --json "$OUT/precision.json"
# 4. the service on the GPU: batching on vs DDM_MAX_BATCH_SIZE=1, and the engine alone for the ratios.
step service 130 $PY benchmarks/service_load.py --serve --env DDM_DEVICE="$DEVICE" \
    --compare DDM_MAX_BATCH_SIZE=1 --engine-reference --images "$DATA/celeba" "${SERVICE[@]}" \
    --json "$OUT/service.json"
# 5. torch.compile of the shipped UNet (compile time is the warm-up column), last: it may not finish.
step compile 50 $PY benchmarks/engine_bench.py --device "$DEVICE" --images "$DATA/celeba" "${COMPILE[@]}" \
    --json "$OUT/engine_compile.json"
ls -l "$OUT" | tee -a "$LOG"
