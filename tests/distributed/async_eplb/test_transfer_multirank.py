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
import torch

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import Transfer, plan_layer
from vllm.distributed.async_eplb.staging import RowLayout, StagingBuffer
from vllm.distributed.async_eplb.transports import (
    copy_duplicates,
    copy_local,
    row_nbytes,
)
from vllm.distributed.async_eplb.transports.p2p import (
    direct_messages,
    direct_runs,
    message_tag,
)

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


def _direct_exchange_stages_every_slot(
    num_ranks: int, one_tensor: bool, by_tensor: bool, seed: int
) -> None:
    """Pair every sender's direct messages with its receiver's, in order, and
    copy them: with local copies and duplicates, each rank's staging rows must
    hold its new placement's experts (the message lists of NCCL's batch)."""
    gen = torch.Generator().manual_seed(seed)
    slots, experts = 5, 3 * num_ranks
    old = torch.cat(
        [
            torch.arange(experts),
            torch.randint(experts, (5 * num_ranks - experts,), generator=gen),
        ]
    )
    new = old[torch.randperm(old.numel(), generator=gen)]
    new[:2] = new[0]  # a duplicate in rank 0's slots
    plan = plan_layer(old, new, num_ranks, ranks_per_node=1)
    # expert e's bytes: row e of each table (two tensors unless flat)
    tables = [torch.randint(256, (experts, 64), dtype=torch.uint8, generator=gen)]
    if not one_tensor:
        tables.append(torch.randn(experts, 3, 5, generator=gen).to(torch.bfloat16))
    weights = [
        [t[old[r * slots : (r + 1) * slots]] for t in tables] for r in range(num_ranks)
    ]
    cpu = DeviceBackend.for_device("cpu")
    staging = [StagingBuffer(w, cpu, by_tensor=by_tensor) for w in weights]
    buffers = [b.slot(0) for b in staging]
    for views in buffers:
        for view in views:  # poison: every staged slot must be written
            view.view(torch.uint8).fill_(0xAB)
    # What P2PTransport decides: runs merge when every staging tensor is
    # contiguous (laid out by tensor, or one unpadded tensor).
    flat = all(v.is_contiguous() for v in buffers[0])
    one_row = len(weights[0]) == 1
    assert flat == (
        by_tensor
        or (one_row and RowLayout.of(weights[0]).row_bytes == row_nbytes(weights[0]))
    )
    for src in range(num_ranks):
        for dst in range(num_ranks):
            sends = [t for t in plan.ranks[src].sends if t.dst_rank == dst]
            recvs = [t for t in plan.ranks[dst].receives if t.src_rank == src]
            sends.sort(key=lambda t: t.dst_slots[0])
            recvs.sort(key=lambda t: t.dst_slots[0])
            out = direct_messages(direct_runs(sends, flat), weights[src], sender=True)
            into = direct_messages(direct_runs(recvs, flat), buffers[dst], sender=False)
            assert len(out) == len(into)
            for message, target in zip(out, into, strict=True):
                assert message.dtype == target.dtype == torch.uint8
                target.copy_(message)  # what the matched send/recv does
    for rank in range(num_ranks):
        copy_local(plan.ranks[rank], weights[rank], buffers[rank])
        copy_duplicates(plan.ranks[rank], buffers[rank], None)
        for slot in plan.ranks[rank].changed_slots:
            expert = int(new[rank * slots + slot])
            for view, table in zip(buffers[rank], tables, strict=True):
                assert torch.equal(view[slot], table[expert]), (rank, slot)


@pytest.mark.parametrize(
    "one_tensor,by_tensor",
    [(True, False), (False, False), (False, True)],
    ids=["one-tensor", "two-tensors", "two-tensors-by-tensor"],
)
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_direct_messages_pair_up_and_stage_every_slot(
    num_ranks: int, one_tensor: bool, by_tensor: bool
) -> None:
    for seed in range(5):
        _direct_exchange_stages_every_slot(num_ranks, one_tensor, by_tensor, seed)


def test_direct_runs_merge_only_flat_runs_consecutive_on_both_sides() -> None:
    def t(src: int, dst: int) -> Transfer:
        return Transfer(
            expert=0, src_rank=0, src_slot=src, dst_rank=1, dst_slots=(dst,)
        )

    transfers = [t(0, 0), t(1, 1), t(2, 2), t(5, 3), t(6, 5)]
    assert direct_runs(transfers, flat=True) == [(0, 0, 3), (5, 3, 1), (6, 5, 1)]
    assert direct_runs(transfers, flat=False) == [
        (0, 0, 1),
        (1, 1, 1),
        (2, 2, 1),
        (5, 3, 1),
        (6, 5, 1),
    ]


def test_direct_messages_refuse_non_contiguous_staging_rows() -> None:
    rows = torch.zeros(4, 8, dtype=torch.uint8)[:, :4]  # strided like a 2-tensor row
    with pytest.raises(ValueError, match="not contiguous"):
        direct_messages([(0, 0, 2)], [rows], sender=False)
    sent = direct_messages([(0, 0, 2)], [rows], sender=True)  # copied, not refused
    assert sent[0].numel() == 8
