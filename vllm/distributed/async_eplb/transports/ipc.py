"""Intra-node one-sided staging through CUDA IPC.

At construction every rank exports its expert weights (all layers) as IPC
handles and opens those of its node peers once. Staging a layer then pulls the
rows it needs with device copies on the worker's stream: copy engines only,
no communication kernel that could deadlock against the forward pass's
all-to-all. A peer's rows are read only while that layer is uncommitted
everywhere (the agreement guarantees it). Cross-node receives go through a
``p2p`` or ``gloo-staged`` transport on the same group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import LayerPlan
from vllm.distributed.async_eplb.staging import copy_slot_runs, slot_runs
from vllm.distributed.async_eplb.transports import (
    Transport,
    copy_duplicates,
    copy_local,
    row_nbytes,
)
from vllm.distributed.async_eplb.transports.gloo_staged import GlooStagedTransport
from vllm.distributed.async_eplb.transports.p2p import P2PTransport

__all__ = ["IpcTransport"]


class IpcTransport(Transport):
    name = "ipc"

    def __init__(
        self,
        backend: DeviceBackend,
        group: Any,
        expert_weights: Sequence[Sequence[torch.Tensor]],
        ranks_per_node: int,
        *,
        timeout: float,
    ) -> None:
        if backend.device.type != "cuda":
            raise ValueError(
                f"transport 'ipc' needs a CUDA device, not {backend.device}"
            )
        if ranks_per_node <= 0:
            raise ValueError(f"ranks_per_node must be > 0, got {ranks_per_node}")
        self.backend = backend
        self.group = group
        self.timeout = timeout
        self.rank = dist.get_rank(group)
        self.ranks_per_node = ranks_per_node
        node = self.rank // ranks_per_node
        world = dist.get_world_size(group)
        self.node_peers = {
            r
            for r in range(node * ranks_per_node, (node + 1) * ranks_per_node)
            if r < world and r != self.rank
        }
        cross_cls = (
            GlooStagedTransport
            if "gloo" in str(dist.get_backend(group))
            else P2PTransport
        )
        self.cross_node: P2PTransport = cross_cls(backend, group, timeout=timeout)
        self._layer_of = {
            layer[0].data_ptr(): i for i, layer in enumerate(expert_weights)
        }
        # Weights must be written before a peer can read them.
        backend.synchronize()
        handles = [[backend.ipc_handle(w) for w in layer] for layer in expert_weights]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, handles, group=group)
        self._peer_weights: dict[int, list[list[torch.Tensor]]] = {
            r: [[backend.open_ipc_handle(h) for h in layer] for layer in gathered[r]]
            for r in sorted(self.node_peers)
        }

    def set_abort_check(self, check: Callable[[], bool]) -> None:
        super().set_abort_check(check)
        self.cross_node.set_abort_check(check)

    def waiting_for(self) -> tuple[int, ...]:
        return tuple(sorted({*super().waiting_for(), *self.cross_node.waiting_for()}))

    def in_flight(self) -> int:
        return super().in_flight() + self.cross_node.in_flight()

    def helper_threads(self) -> list[threading.Thread]:
        return super().helper_threads() + self.cross_node.helper_threads()

    def prepare_job(self, job_id: int) -> None:
        """Wait until every peer's weights are final before pulling from them.

        Each worker has synchronised its own caller's stream (earlier commits)
        before this; the barrier makes that true on the whole group. The
        cross-node transport starts the job's message tags.
        """
        self.cross_node.prepare_job(job_id)
        work = dist.barrier(group=self.group, async_op=True)
        self._wait([work], [sorted(self.node_peers)], pollable=self.cross_node.pollable)

    def stage_layer(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
    ) -> int:
        layer = self._layer_of.get(weights[0].data_ptr())
        if layer is None:
            raise ValueError(
                "transport 'ipc' was not built with these weights "
                f"(tensor at {weights[0].data_ptr():#x})"
            )
        rank_plan = plan.ranks[rank]
        copy_local(rank_plan, weights, buffers)
        pulled = 0
        for peer in sorted(self.node_peers):
            ts = [t for t in rank_plan.receives if t.src_rank == peer]
            if not ts:
                continue
            runs = slot_runs([t.dst_slots[0] for t in ts], [t.src_slot for t in ts])
            copy_slot_runs(buffers, self._peer_weights[peer][layer], runs)
            pulled += len(ts)
        copy_duplicates(rank_plan, buffers, self.node_peers)
        other_ranks = set(range(plan.num_ranks)) - self.node_peers - {rank}
        received = self.cross_node.exchange(
            plan, rank, weights, buffers, packed=packed, peers=other_ranks
        )
        return pulled * row_nbytes(weights) + received
