#!/usr/bin/env bash
# Issue 13, step 5: quality and decode speed over the number of sections (split points h = L/p) with
# a ridge bridge fitted on KJV + the source's own samples, no gradient training.
#   scripts/bridge_tradeoff.sh OUT "2 3 6"
# Writes docs/results/bridge/ppl.json entries ridge-mix-p{P} and docs/bench/cpu-smollm2-split{P}-ridge.json.
set -euo pipefail
out=$1; sections=${2:-"2 3 6"}
for p in $sections; do
  dir=$out/p$p-ridge-mix
  [ -f "$dir/config.json" ] || stag convert smollm2-135m "$dir" --sections "$p" --bridge ridge \
      --calibrate kjv:train --calibrate self:131072 --calibrate-tokens 131072
  python scripts/ppl_ratio.py --results docs/results/bridge/ppl.json "ridge-mix-p$p=$dir"
  stag bench "$dir" --baseline smollm2-135m --batch-sizes 1 --prompt-len 64 --new-tokens 64 --repeats 3 --no-hf \
      -o "docs/bench/cpu-smollm2-split$p-ridge.json"
done
