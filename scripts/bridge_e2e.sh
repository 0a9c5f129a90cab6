#!/usr/bin/env bash
# Issue 13, step 4: the end-to-end fine-tune from a bridged split model against the control, with
# the fine-tuning budget and data of recipes/smollm2-stag-cpu.yaml (30,720 KJV tokens), then both
# scored on kjv:heldout and the off-domain pydoc:heldout (scripts/ppl_ratio.py).
#   scripts/bridge_e2e.sh BRIDGED_MODEL OUT [--hidden] [--tuned] [--lm]
# --hidden: also with --hidden-weight 0.1; --tuned: also at lr 5e-5, and at lr 2e-4 with 5 warm-up steps;
# --lm: also without distillation (the LM loss alone, as the control), 5 warm-up steps.
# BRIDGED_MODEL: a split conversion whose bridge was fitted (stag convert --bridge mlp --calibrate ...)
# and trained (stag finetune --train bridge ...). About 4 min per fine-tune on a 2-core CPU.
set -euo pipefail
bridged=$1; out=$2; shift 2
common=(--data kjv:train --heldout kjv:heldout --seq-len 256 --batch-size 4 --grad-accum 2 --lr 2e-4
        --max-tokens 30720 --eval-every 3 --eval-sequences 16 --save-every 1000 --compile)
once() {  # NAME MODEL, extra options (a later option overrides the same one in $common); skipped if done
  local name=$1 model=$2; shift 2
  [ -f "$out/$name/config.json" ] || stag finetune "$model" "${common[@]}" "$@" "$out/$name"
}
variant() { local name=$1; shift; once "$name" "$bridged" --distill-from smollm2-135m --distill-alpha 0.5 "$@"; }
once control smollm2-135m
variant split2-bridge
for flag in "$@"; do
  case $flag in
    --hidden) variant split2-bridge-hidden --hidden-weight 0.1 ;;
    --tuned) variant split2-bridge-lr5e-5 --lr 5e-5; variant split2-bridge-warmup5 --warmup-steps 5 ;;
    --lm) once split2-bridge-lm "$bridged" --warmup-steps 5 ;;
    *) echo "unknown option $flag" >&2; exit 2 ;;
  esac
done
