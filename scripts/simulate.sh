#!/usr/bin/env bash
# Set up and run the main job on a fresh machine: the simulated expert-parallel
# deployment (4 CPU ranks by default). Arguments go to the simulator, e.g.
#   scripts/simulate.sh --ranks 2 --mode sync
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup_env.sh .venv-sim sim
exec .venv-sim/bin/python -m vllm.distributed.async_eplb.simulate "$@"
