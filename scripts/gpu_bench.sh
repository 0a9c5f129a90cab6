#!/usr/bin/env bash
# One command for a GPU machine: the issue-5 benchmark on the SmolLM2-135M shape, bf16, batch 1/4/16.
# Writes docs/bench/<gpu>-smollm2-shape-{split2,shared2}.json. Needs: torch (CUDA), transformers, typer,
# rich, safetensors, accelerate and this repo (pip install -e . --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
python scripts/make_shape_checkpoint.py smollm2-135m runs/shapes/smollm2-135m
python -m stagcli convert runs/shapes/smollm2-135m runs/shapes/split2 --sections 2 --dtype bfloat16 --force
python -m stagcli convert runs/shapes/smollm2-135m runs/shapes/shared2 --sections 2 --mode shared --dtype bfloat16 --force
for variant in split2 shared2; do
  python -m stagcli bench runs/shapes/$variant --baseline runs/shapes/smollm2-135m --dtype bfloat16 \
      --compile --batch-sizes 1,4,16 --prompt-len 128 --new-tokens 128 --repeats 5 \
      -o docs/bench/$gpu-smollm2-shape-$variant.json
done
