"""Shared fixtures for async_eplb tests."""

from __future__ import annotations

import pytest
from torchrun_util import run_torchrun


@pytest.fixture
def torchrun():
    """``torchrun(script, nproc, args=(), timeout=120)`` -> CompletedProcess."""
    return run_torchrun
