#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test
# command; CI runs exactly this).
# 1. `.venv-core`, torch and numpy alone (no vLLM, no numba): the package
#    imports, and the pure parts pass on their NumPy paths;
# 2. `.venv`, with vLLM's CPU build: ruff, then every test (GPU tests skip
#    without CUDA and are reported as skipped).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HF_HUB_OFFLINE=1
scripts/setup_env.sh .venv-core core
ASYNC_EPLB_EXPECT_VLLM=0 .venv-core/bin/python -m pytest -q -p no:cacheprovider \
  tests/distributed/async_eplb/test_import.py \
  tests/distributed/async_eplb/test_maps.py \
  tests/distributed/async_eplb/test_planner.py \
  tests/distributed/async_eplb/test_rebalance_api.py \
  tests/distributed/async_eplb/test_rebalance_plan.py \
  tests/distributed/async_eplb/test_rebalance_default.py
scripts/setup_env.sh .venv test
.venv/bin/python -m ruff check .
ASYNC_EPLB_EXPECT_VLLM=1 .venv/bin/python -m pytest -q -ra "$@"
