"""GPU transfer checks (plain torch, no vLLM); skipped without CUDA.

Run with ``-s`` to see the figures: ``ipc`` rate against the same-run
device-to-device copy rate, and the main stream's slowdown while the worker
stages on its side stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "multirank" / "gpu_transfer_main.py"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multirank,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_ipc_between_two_processes_and_overlap(torchrun) -> None:
    proc = torchrun(SCRIPT, 2, ["--layers", "4", "--scale", "2"], timeout=300)
    print(proc.stdout)
    for rank in range(2):
        assert f"OK rank {rank}" in proc.stdout
        assert f"RATE rank {rank}:" in proc.stdout
        assert f"OVERLAP rank {rank}:" in proc.stdout
