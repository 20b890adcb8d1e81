"""Our EplbState with vLLM's ParallelConfig, EPLBConfig, parallel state (gloo),
MixtureOfExperts protocol and EplbLayerState objects (2 CPU ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_util import run_torchrun

pytest.importorskip("vllm.config")
SCRIPT = Path(__file__).parent / "multirank" / "eplb_state_vllm.py"


@pytest.mark.vllm
@pytest.mark.multirank
def test_eplb_state_with_vllm_objects() -> None:
    proc = run_torchrun(SCRIPT, 2, timeout=240)
    assert proc.stdout.count("VLLM OK") == 2, proc.stdout[-2000:]
