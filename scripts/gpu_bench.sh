#!/usr/bin/env bash
# One command for a GPU machine: decode latency on the SmolLM2-135M shape (random weights: speed does
# not depend on them), bf16, torch.compile + CUDA graphs, every form against the same engine on the
# unconverted model and against HF static-cache generate. Writes docs/bench/<gpu>-smollm2-shape-<form>.json.
#   scripts/gpu_bench.sh [BATCH_SIZES]       (default 1; e.g. 1,16 when the session has time to spare)
# Order = priority (a lent GPU gives 30 device-minutes a session): the parallel forms first, since the
# issue's shared target (<= 1.15x the control) can only be met by shared2-parallel (docs/performance.md).
# Needs: torch (CUDA), transformers, typer, rich, safetensors, accelerate and this repo on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
batches="${1:-1}"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
src=runs/shapes/smollm2-135m
[ -f $src/config.json ] || python scripts/make_shape_checkpoint.py smollm2-135m $src
declare -A forms=([shared2-parallel]="--mode shared --cross-attn parallel" [split2-parallel]="--cross-attn parallel"
                  [split2]="" [shared2]="--mode shared")
for form in shared2-parallel split2-parallel split2 shared2; do
  python -m stagcli convert $src runs/shapes/$form --sections 2 ${forms[$form]} --dtype bfloat16 --force
  python -m stagcli bench runs/shapes/$form --baseline $src --dtype bfloat16 --compile --batch-sizes "$batches" \
      --prompt-len 128 --new-tokens 128 --repeats 5 -o docs/bench/$gpu-smollm2-shape-$form.json
  if [ -n "${OUT:-}" ]; then cp docs/bench/$gpu-smollm2-shape-$form.json "$OUT"/; fi
done
