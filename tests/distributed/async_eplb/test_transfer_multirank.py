"""Multi-rank staging under torchrun (gloo on CPU): bit-exact after commit.

Each launch runs random old/new placements over several layers with fp32,
bf16 and uint8 (FP8-like) weight tensors, two jobs back to back, a cancel in
the middle of a job, and (2 ranks) a wait ended by the abort check long before
the timeout, an aborted job's unmatched messages kept away from the next job
(per-job tags), and a rank failing mid-layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm.distributed.async_eplb.transports.p2p import message_tag

SCRIPT = Path(__file__).parent / "multirank" / "transfer_worker_main.py"


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("nproc", "args"),
    [
        pytest.param(
            2,
            [
                "--transport",
                "gloo-staged",
                "--modes",
                "full,cancel,abort,tags,fault",
            ],
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


def test_message_tags_differ_per_job_and_layer_and_fit_gloo() -> None:
    tags = {message_tag(job, layer) for job in range(4) for layer in range(60)}
    assert len(tags) == 4 * 60
    assert 0 <= message_tag(2**40, 2**40) < 2**31
    with pytest.raises(ValueError, match="-1"):
        message_tag(-1, 0)
