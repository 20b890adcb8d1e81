"""The package imports from this checkout, with vLLM installed and without it."""

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_package_imports_from_this_repo():
    module = importlib.import_module("vllm.distributed.async_eplb")
    assert Path(module.__file__).resolve().is_relative_to(REPO)
    for name in ("maps", "rebalance_algo"):
        importlib.import_module(f"vllm.distributed.async_eplb.{name}")


def test_vllm_presence_is_as_expected():
    expected = os.environ.get("ASYNC_EPLB_EXPECT_VLLM")
    if expected is None:
        pytest.skip("ASYNC_EPLB_EXPECT_VLLM is unset: scripts/test.sh sets it")
    has_vllm = importlib.util.find_spec("vllm.config") is not None
    assert has_vllm == (expected == "1")
    if has_vllm:
        import vllm

        # vLLM's own package still resolves to its install, not to this repo.
        assert not Path(vllm.__file__).resolve().is_relative_to(REPO / "vllm")
