"""Multi-rank staging under torchrun (gloo on CPU): bit-exact after commit.

Each launch runs random old/new placements over several layers with fp32,
bf16 and uint8 (FP8-like) weight tensors, two jobs back to back, a cancel in
the middle of a job, and (2 ranks) a rank failing mid-layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "multirank" / "transfer_worker_main.py"


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("nproc", "args"),
    [
        pytest.param(
            2,
            ["--transport", "gloo-staged", "--modes", "full,cancel,fault"],
            id="2ranks-gloo-staged-fault",
        ),
        pytest.param(
            4,
            ["--transport", "p2p", "--ranks-per-node", "2", "--ring", "2"],
            id="4ranks-2pernode-p2p-ring2",
        ),
    ],
)
def test_staging_is_bit_exact(torchrun, nproc: int, args: list[str]) -> None:
    proc = torchrun(SCRIPT, nproc, args, timeout=180)
    modes = args[args.index("--modes") + 1] if "--modes" in args else "full,cancel"
    for rank in range(nproc):
        for mode in modes.split(","):
            assert f"OK rank {rank} {mode}:" in proc.stdout, proc.stdout
