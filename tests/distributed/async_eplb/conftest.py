"""Shared fixtures for async_eplb tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torchrun_util import run_torchrun


@pytest.fixture
def torchrun():
    """``torchrun(script, nproc, args=(), timeout=120)`` -> CompletedProcess."""
    return run_torchrun


@pytest.fixture(scope="module")
def one_rank_world(tmp_path_factory: pytest.TempPathFactory):
    """A gloo world of one rank in this process, for ``EplbState`` unit tests."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "f"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
