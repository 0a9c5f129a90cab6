#!/usr/bin/env bash
# Issue 13 on a lent GPU: the attention bridge trained at GPU speed, then what it buys. Run after
# scripts/gpu_pack.sh's three parts were copied to /tmp/carry (the third carries the training mix):
#   scripts/gpu_bridge.sh                       # every step; about 9 minutes on an H100 (estimated, not yet run)
#   STEPS="ppl accept" scripts/gpu_bridge.sh    # some steps (a later call, while the machine is warm)
# Steps, in order of priority, each on its own (one failing does not stop the next):
#   convert  split p=2 + attention bridge, its linear map fitted on KJV + the source's own samples
#   bridge   the bridge alone trained by distillation through the frozen model, KJV / self / Linux docs
#            in equal shares, bf16, for $BRIDGE_MINUTES minutes (default 3)
#   ppl      perplexity ratios to the source on kjv, pydoc and fortunes held-out text (ppl_ratio.py), of the
#            split model and of the exact-cache form with the same bridge
#   accept   verified staggering with that bridge: acceptance, output identical to the source's
#   depth    exact-cache with --bridge-depth 4 (the bridge reads section 1's state after 4 layers): fitted,
#            trained through that form as in `bridge`, ppl ratios; verify shape check at that depth;
#            decode ms/token of depths 0, 4 and 8 against the source (gpu_decode.py)
#   e2e      the control and the bridged split model, each fine-tuned on $E2E_TOKENS KJV tokens
#            (default 524,288) with the same settings, then ppl ratios of both
# Results (JSON, metrics.jsonl) go to $OUT, or docs/results/bridge/gpu. SMALL=1 shrinks every budget,
# for a dry run of the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=docs/results/bridge/gpu
source scripts/gpu_setup.sh
STEPS="${STEPS:-convert bridge ppl accept depth e2e}"
SELF=$(ls "$cache"/corpora/selftext-131072.jsonl "$cache"/selftext/*-131072.jsonl 2>/dev/null | head -1)
if [ -n "${SMALL:-}" ]; then  # a dry run: tiny budgets everywhere
  CAL=4096 MIN=0.3 E2E=2048 N=2 SEQ=64 BATCH=2 EVERY=2 COMPILE=--no-compile
else
  CAL=131072 MIN=${BRIDGE_MINUTES:-3} E2E=${E2E_TOKENS:-524288} N=32 SEQ=512 BATCH=16 EVERY=20 COMPILE=--compile
fi
bridged=$W/p2-attn-bridge
run() { echo "== $1"; [[ " $STEPS " == *" $1 "* ]]; }
keep() { cp "$1/metrics.jsonl" "$R/$2-metrics.jsonl" 2>/dev/null; cp "$1/stag_recipe.json" "$R/$2-recipe.json" 2>/dev/null; }

if run convert; then
  timeout 120 python3 -m stagcli convert smollm2-135m $W/p2-attn --sections 2 --bridge attn --calibrate kjv:train \
      --calibrate "$SELF" --calibrate-tokens $CAL --force
fi
train_bridge() {  # SRC OUT: the bridge alone, by distillation through the frozen model
  timeout $(python3 -c "print(int($MIN * 60 + 120))") python3 -m stagcli finetune "$1" "$2" \
      --train bridge --distill-from smollm2-135m --distill-alpha 1 --balance-data --data kjv:train \
      --data "$SELF" --data linuxdoc:train --heldout kjv:heldout --seq-len $SEQ --batch-size $BATCH \
      --lr 3e-4 --warmup-steps 20 --max-tokens 100000000 --max-minutes $MIN --eval-every $((EVERY * 5)) \
      --eval-sequences 16 --save-every 100000 --precision auto $COMPILE --force 2>&1 | tail -12
}
if run bridge; then
  train_bridge $W/p2-attn $bridged
  keep $bridged $gpu-attn-bridge
fi
if run ppl; then
  timeout 150 python3 -m stagcli convert smollm2-135m $W/exact-cache --mode exact-cache --bridge attn \
      --bridge-from $bridged --force
  timeout 150 python3 scripts/ppl_ratio.py --sequences $N --results "$R/ppl.json" attn-bridge-gpu=$bridged \
      exact-cache-attn-bridge-gpu=$W/exact-cache
fi
if run accept; then
  timeout 150 python3 -m stagcli convert smollm2-135m $W/verify --mode verify --bridge attn --bridge-from $bridged \
      --force && timeout 150 python3 scripts/verify_acceptance.py --prompts $N --results "$R/acceptance.json" \
      attn-bridge-gpu=$W/verify
fi
if run depth; then
  timeout 150 python3 -m stagcli convert smollm2-135m $W/ec-d4 --mode exact-cache --bridge attn --bridge-depth 4 \
      --calibrate kjv:train --calibrate "$SELF" --calibrate-tokens $CAL --force
  train_bridge $W/ec-d4 $W/ec-d4-bridge
  keep $W/ec-d4-bridge $gpu-exact-cache-depth4-bridge
  timeout 150 python3 scripts/ppl_ratio.py --sequences $N --results "$R/ppl.json" exact-cache-depth4-ridge-gpu=$W/ec-d4 \
      exact-cache-depth4-attn-gpu=$W/ec-d4-bridge
  timeout 150 python3 scripts/gpu_verify_shape.py --bridge-depth 4 --out "$R/verify-shape-depth4.json"
  # its speed: section 2 and the rest of section 1 on two streams ("(no compile)" rows) against the source
  # (and at depth 8: docs/bridge.md, "How deep?", orders the depths by a depth model this measures)
  timeout 420 python3 scripts/gpu_decode.py --batches 1 --no-hf --out "$R/decode-depth4.json" \
      --forms exact-cache-attn,exact-cache-depth4-attn,verify-depth4-attn,exact-cache-depth8-attn,verify-depth8-attn
fi
if run e2e; then
  common=(--data kjv:train --heldout kjv:heldout --seq-len $SEQ --batch-size $BATCH --lr 2e-4 --warmup-steps 10
          --max-tokens $E2E --eval-every $EVERY --eval-sequences 16 --save-every 100000 --precision auto $COMPILE --force)
  timeout 150 python3 -m stagcli finetune smollm2-135m $W/e2e-control "${common[@]}" 2>&1 | tail -6
  keep $W/e2e-control $gpu-e2e-control
  timeout 200 python3 -m stagcli finetune $bridged $W/e2e-bridged "${common[@]}" --distill-from smollm2-135m \
      --distill-alpha 0.5 2>&1 | tail -6
  keep $W/e2e-bridged $gpu-e2e-attn-bridge
  timeout 120 python3 scripts/ppl_ratio.py --sequences $N --results "$R/ppl.json" e2e-control-gpu=$W/e2e-control \
      e2e-attn-bridge-gpu=$W/e2e-bridged
fi
ls -la "$R"
