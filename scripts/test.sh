#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test
# command; CI runs exactly this). Arguments go to the main pytest run (2.).
# 1. `.venv-core`, torch and numpy alone (no vLLM, no numba): the package
#    imports, and the pure parts pass on their NumPy paths;
# 2. `.venv`, with vLLM 0.32's CPU build: ruff, then every test (GPU tests skip
#    without CUDA and are reported as skipped), then vLLM 0.32's own
#    tests/distributed/test_eplb_algo.py calling our functions;
# 3. `.venv-vllm033`, with vLLM 0.33's CUDA wheel used on CPU
#    (VLLM_TARGET_DEVICE=cpu): the tests marked `vllm`, then vLLM 0.33's own
#    test_eplb_algo.py calling our functions and, as a control, vLLM's.
# vLLM's test files come from its source distribution on PyPI, fetched once
# into .vllm-upstream-tests/ (tests/distributed/async_eplb/vllm_upstream).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HF_HUB_OFFLINE=1
upstream=tests/distributed/async_eplb/vllm_upstream/run_upstream.py

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
.venv/bin/python "$upstream"

scripts/setup_env.sh .venv-vllm033 vllm033
export VLLM_TARGET_DEVICE=cpu
ASYNC_EPLB_EXPECT_VLLM=1 .venv-vllm033/bin/python -m pytest -q -ra -p no:cacheprovider \
  -m vllm tests/distributed/async_eplb
.venv-vllm033/bin/python "$upstream"
.venv-vllm033/bin/python "$upstream" --against vllm
