#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (the README's test command).
# 1. a core-only venv (torch + numpy, no vLLM): the package imports and its
#    import test passes without vLLM;
# 2. a venv with vLLM's CPU build: ruff, then every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export HF_HUB_OFFLINE=1
scripts/setup_env.sh .venv-core
ASYNC_EPLB_EXPECT_VLLM=0 .venv-core/bin/python -m pytest -q tests/distributed/async_eplb/test_import.py
scripts/setup_env.sh .venv --with-vllm
.venv/bin/python -m ruff check .
ASYNC_EPLB_EXPECT_VLLM=1 .venv/bin/python -m pytest -q -ra "$@"
