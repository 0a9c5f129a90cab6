#!/usr/bin/env bash
# The second of two back-to-back GPU calls (scripts/gpu_pack.sh says how the model travels):
# the real SmolLM2-135M-Instruct. In order of priority, each step on its own (one failing does not
# stop the next), results into $OUT (or docs/bench/gpu-real):
#   1. verified staggering: stag bench on kjv prompts (vs the same engine, HF static, HF prompt lookup)
#   2. identical output and acceptance on kjv and pydoc prompts, fp32 and bf16 (gpu_verify_check.py)
#   3. fine-tuning throughput and peak memory, bf16: control, split p=2 + bridge, shared p=2 parallel
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=docs/bench/gpu-real
source scripts/gpu_setup.sh
tar xf $C/bridge.tar -C $W

stag convert smollm2-135m $W/verify --mode verify --bridge mlp --bridge-from $W/bridge --dtype bfloat16 --force
stag bench $W/verify --dtype bfloat16 --compile --prompt-data kjv:heldout --prompt-len 64 --new-tokens 64 \
    --batch-sizes 1 --repeats 5 -o "$R/$gpu-smollm2-verify-kjv.json" 2>&1 | grep -v Warn
python3 scripts/gpu_verify_check.py $W/verify --out "$R/$gpu-smollm2-verify-identical.json"

ft() {  # name, model, extra options: 12 steps of 8 x 512 tokens, bf16, compiled
  timeout 150 python3 -m stagcli finetune "$2" $W/ft-$1 --data kjv:train --heldout kjv:heldout --seq-len 512 \
      --batch-size 8 --grad-accum 1 --max-steps 12 --warmup-steps 2 --eval-every 1000 --eval-sequences 8 \
      --save-every 1000 --precision auto --compile --force "${@:3}" 2>&1 | tail -4
  cp $W/ft-$1/metrics.jsonl "$R/$gpu-finetune-$1.jsonl" 2>/dev/null
}
ft control smollm2-135m
stag convert smollm2-135m $W/split2-bridge --bridge mlp --bridge-from $W/bridge --force
ft split2-bridge $W/split2-bridge --distill-from smollm2-135m
stag convert smollm2-135m $W/shared2-parallel --mode shared --cross-attn parallel --force
ft shared2-parallel $W/shared2-parallel --distill-from smollm2-135m
ls -la "$R"
