#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_pack.sh's two parts are in /tmp/carry: install them, then run
# (or continue) the issue-6 experiment. Every call continues where the last stopped (finished variants
# are skipped, an interrupted fine-tune resumes from its last checkpoint), so run it until it finishes:
#   scripts/gpu_experiment.sh [stag experiment options, e.g. --variants control,split2-zero,shared2]
# lm-eval is not on the GPU machine, so the eval step is skipped; held-out perplexity is measured
# during fine-tuning. Results go to docs/results/smollm2 and are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=docs/results/smollm2
source scripts/gpu_setup.sh  # the carried wheels and corpora
# stop cleanly before the device's 10-minute call limit; the next call continues
timeout --signal=INT "${STAG_TIME_LIMIT:-540}" python -m stagcli experiment recipes/smollm2-stag.yaml --out runs/smollm2 \
    --results docs/results/smollm2 --skip eval "$@" || echo "stopped (time limit or error): run again to continue"
if [ -n "${OUT:-}" ] && [ -d docs/results/smollm2 ]; then cp docs/results/smollm2/* "$OUT"/; fi
