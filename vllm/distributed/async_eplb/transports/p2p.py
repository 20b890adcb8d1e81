"""Batched point-to-point staging: one batch per layer, few large messages.

The experts one rank sends to a peer are packed, all weight tensors included,
into ``row_bytes`` rows (a per-tensor message is about half as fast). On
device collectives each run of consecutive target slots is one message that
lands straight in the receiver's staging rows; on gloo, which pays per
message, each peer gets one message, spread to its slots on arrival.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import LayerPlan, Transfer
from vllm.distributed.async_eplb.staging import RowLayout, copy_slot_runs, slot_runs
from vllm.distributed.async_eplb.transports import (
    TransferError,
    Transport,
    copy_duplicates,
    copy_local,
    row_nbytes,
)

__all__ = ["Message", "P2PTransport", "wait_works"]


@dataclass
class Message:
    is_send: bool
    peer: int
    rows: torch.Tensor  # [n, row_bytes] uint8, contiguous


def _by_peer(
    transfers: Sequence[Transfer],
    peer_of: Callable[[Transfer], int],
    peers: set[int] | None,
) -> dict[int, list[Transfer]]:
    """Group by peer; within a peer, order by first target slot (both sides)."""
    grouped: dict[int, list[Transfer]] = {}
    for t in transfers:
        peer = peer_of(t)
        if peers is None or peer in peers:
            grouped.setdefault(peer, []).append(t)
    return {
        p: sorted(ts, key=lambda t: t.dst_slots[0]) for p, ts in sorted(grouped.items())
    }


def wait_works(
    works: Sequence[Any],
    peers: Sequence[Sequence[int]],
    timeout: float,
    should_abort: Callable[[], bool],
    *,
    pollable: bool = True,
) -> None:
    """Wait for every work, never longer than ``timeout``; errors name peers.

    ``pollable`` works (NCCL, HCCL) are polled, so that a stop request ends
    the wait promptly. gloo's point-to-point works only progress inside
    ``wait`` and a timed-out wait closes the connection, so they get one
    bounded ``wait(timeout)`` each.
    """
    deadline = time.monotonic() + timeout
    delay = 1e-4
    pending = list(range(len(works))) if pollable else []
    while pending:
        pending = [i for i in pending if not works[i].is_completed()]
        if not pending:
            break
        waiting_on = sorted({p for i in pending for p in peers[i]})
        if should_abort():
            raise TransferError(
                f"aborted while waiting for ranks {waiting_on}", waiting_on
            )
        if time.monotonic() > deadline:
            raise TransferError(
                f"timed out after {timeout:.1f}s waiting for ranks {waiting_on}",
                waiting_on,
            )
        time.sleep(delay)
        delay = min(delay * 2, 2e-3)
    for work, work_peers in zip(works, peers, strict=True):
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            work.wait(timeout=timedelta(seconds=remaining))
        except Exception as exc:
            raise TransferError(
                f"transfer with ranks {list(work_peers)} failed: {exc}", work_peers
            ) from exc


class P2PTransport(Transport):
    name = "p2p"

    def __init__(self, backend: DeviceBackend, group: Any, *, timeout: float) -> None:
        self.backend = backend
        self.group = group
        self.timeout = timeout
        self.pollable = "gloo" not in str(dist.get_backend(group))
        self._scratch = torch.empty(0, dtype=torch.uint8, device=backend.device)

    def stage_layer(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
    ) -> int:
        copy_local(plan.ranks[rank], weights, buffers)
        return self.exchange(plan, rank, weights, buffers, packed=packed)

    def exchange(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
        peers: set[int] | None = None,
    ) -> int:
        """Sends and receives of ``rank`` with ``peers`` (all when ``None``)."""
        rank_plan = plan.ranks[rank]
        sends = _by_peer(rank_plan.sends, lambda t: t.dst_rank, peers)
        recvs = _by_peer(rank_plan.receives, lambda t: t.src_rank, peers)
        if not sends and not recvs:
            return 0
        layout = RowLayout.of(weights)
        recv_spans = [
            (peer, ts[offset : offset + length])
            for peer, ts in recvs.items()
            for offset, length in self._message_spans(ts)
        ]
        direct = [packed is not None and _is_run(ts) for _, ts in recv_spans]
        scratch_rows = sum(map(len, sends.values())) + sum(
            len(ts)
            for (_, ts), straight in zip(recv_spans, direct, strict=True)
            if not straight
        )
        scratch = self._scratch_rows(scratch_rows, layout.row_bytes)
        messages: list[Message] = []
        cursor = 0
        for peer, ts in sends.items():
            rows = scratch[cursor : cursor + len(ts)]
            cursor += len(ts)
            runs = slot_runs(range(len(ts)), [t.src_slot for t in ts])
            copy_slot_runs(layout.views(rows), weights, runs)
            for offset, length in self._message_spans(ts):
                messages.append(Message(True, peer, rows[offset : offset + length]))
        spread: list[tuple[torch.Tensor, list[tuple[int, int, int]]]] = []
        for (peer, ts), straight in zip(recv_spans, direct, strict=True):
            if straight:  # lands in the staging rows themselves
                assert packed is not None
                first = ts[0].dst_slots[0]
                rows = packed[first : first + len(ts)]
            else:  # lands in scratch rows, then spread to the target slots
                rows = scratch[cursor : cursor + len(ts)]
                cursor += len(ts)
                firsts = [t.dst_slots[0] for t in ts]
                spread.append((rows, slot_runs(firsts, range(len(ts)))))
            messages.append(Message(False, peer, rows))
        self._run(messages)
        for rows, runs in spread:
            copy_slot_runs(buffers, layout.views(rows), runs)
        copy_duplicates(rank_plan, buffers, peers)
        return sum(map(len, recvs.values())) * row_nbytes(weights)

    def _message_spans(self, transfers: Sequence[Transfer]) -> list[tuple[int, int]]:
        """``(offset, length)`` of each message between one pair of ranks.

        gloo pays per message (one message per peer is about twice as fast on
        loopback), so it gets one per peer and the receiver spreads the rows.
        Device collectives get one message per run of consecutive target
        slots, each landing straight in the staging rows (no receive copy).
        Depends only on the plan and the group, so both sides split alike.
        """
        if not self.pollable:
            return [(0, len(transfers))]
        spans: list[tuple[int, int]] = []
        for i, t in enumerate(transfers):
            if spans and t.dst_slots[0] == transfers[i - 1].dst_slots[0] + 1:
                spans[-1] = (spans[-1][0], spans[-1][1] + 1)
            else:
                spans.append((i, 1))
        return spans

    def _run(self, messages: Sequence[Message]) -> None:
        """Post every message as one batch and wait for all of them."""
        ops = [
            dist.P2POp(
                dist.isend if m.is_send else dist.irecv,
                m.rows,
                dist.get_global_rank(self.group, m.peer),
                self.group,
            )
            for m in messages
        ]
        works = dist.batch_isend_irecv(ops)
        if len(works) == len(messages):
            peers = [[m.peer] for m in messages]
        else:  # coalesced into one work (NCCL / HCCL)
            everyone = sorted({m.peer for m in messages})
            peers = [everyone] * len(works)
        wait_works(
            works, peers, self.timeout, self.should_abort, pollable=self.pollable
        )

    def _scratch_rows(self, num_rows: int, row_bytes: int) -> torch.Tensor:
        """Grow-only scratch, reused across layers: no allocation per layer."""
        needed = num_rows * row_bytes
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(
                needed, dtype=torch.uint8, device=self.backend.device
            )
        return self._scratch[:needed].view(num_rows, row_bytes)


def _is_run(transfers: Sequence[Transfer]) -> bool:
    """Do the transfers target consecutive slots, in order?"""
    first = transfers[0].dst_slots[0]
    return all(t.dst_slots[0] == first + i for i, t in enumerate(transfers))
