"""Transports: execute one layer's transfer plan into the staging buffer.

- ``p2p``: one batch of sends and receives per layer on the EPLB staging
  group (NCCL / HCCL / gloo): on NCCL / HCCL straight from workspace to
  staging rows, one message per tensor and run of experts; on gloo packed
  into rows, few messages per peer (see ``p2p.py``);
- ``gloo-staged``: the same through pinned host memory and gloo (the CPU
  default and the fallback);
- ``ipc``: intra-node one-sided pulls from peers' weights through CUDA IPC
  (copy engines, no communication kernels); cross-node through the others.

Every transport also performs the plan's local copies and duplicates, so after
:meth:`Transport.stage_layer` every changed slot of the rank is staged.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.config import DEFAULT_TIMEOUT_S, TRANSPORT_NAMES
from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import LayerPlan, RankPlan
from vllm.distributed.async_eplb.staging import copy_slot_runs, slot_runs

__all__ = [
    "TRANSPORT_NAMES",
    "TransferError",
    "Transport",
    "copy_duplicates",
    "copy_local",
    "make_transport",
    "resolve_transport",
    "staging_backend",
]


class TransferError(RuntimeError):
    """A transfer failed or timed out; names the peers involved."""

    def __init__(self, message: str, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.peers = tuple(peers)


def _never() -> bool:
    return False


_ABANDONED_LOCK = threading.Lock()


def _still_running(item: Any) -> bool:
    """A waiter thread that has not ended, or a work not completed."""
    if isinstance(item, threading.Thread):
        return item.is_alive()
    return not item.is_completed()


class Transport(ABC):
    name: ClassVar[str]
    should_abort: Callable[[], bool] = staticmethod(_never)
    timeout: float
    _waiting_on: tuple[int, ...] = ()

    def waiting_for(self) -> tuple[int, ...]:
        """Peers (ranks in the staging group) this transport waits for now.

        Read from other threads, to say whom a stalled rank is waiting for.
        """
        return self._waiting_on

    def _set_waiting_on(self, peers: Sequence[int]) -> None:
        self._waiting_on = tuple(peers)

    def _abandon(self, items: Sequence[Any]) -> None:
        """Keep what a wait gave up on: works, or a gloo waiter thread."""
        with _ABANDONED_LOCK:
            self.__dict__.setdefault("_abandoned", []).extend(items)

    def in_flight(self) -> int:
        """Transfers this transport gave up on that are still running.

        An abandoned receive may still land in the staging buffer it was
        posted on (every backend: gloo's waiter threads, NCCL/HCCL works), so
        no new job may stage into that buffer before this is 0.
        """
        with _ABANDONED_LOCK:
            left = [x for x in self.__dict__.get("_abandoned", ()) if _still_running(x)]
            self.__dict__["_abandoned"] = left
            return len(left)

    def helper_threads(self) -> list[threading.Thread]:
        """This transport's waiter threads still running (for shutdown)."""
        with _ABANDONED_LOCK:
            items = self.__dict__.get("_abandoned", ())
        return [x for x in items if isinstance(x, threading.Thread) and x.is_alive()]

    def _wait(
        self, works: Sequence[Any], peers: Sequence[Sequence[int]], *, pollable: bool
    ) -> None:
        """Wait for this transport's works within its timeout and abort check,
        keeping :meth:`waiting_for` up to date."""
        from vllm.distributed.async_eplb.transports.p2p import wait_works

        wait_works(
            works,
            peers,
            self.timeout,
            self.should_abort,
            pollable=pollable,
            progress=self._set_waiting_on,
            abandon=self._abandon,
        )

    def set_abort_check(self, check: Callable[[], bool]) -> None:
        """A transport waiting on peers gives up once ``check()`` is true."""
        self.should_abort = check

    def prepare_job(self, job_id: int) -> None:
        """Called by the worker before a job's first layer (all ranks), with
        the job's id, which every rank agrees on."""
        return  # nothing to agree on by default

    @abstractmethod
    def stage_layer(
        self,
        plan: LayerPlan,
        rank: int,
        weights: Sequence[torch.Tensor],
        buffers: Sequence[torch.Tensor],
        *,
        packed: torch.Tensor | None = None,
    ) -> int:
        """Stage every changed slot of ``rank`` into ``buffers``; bytes received.

        ``weights`` are the layer's workspace tensors (old placement, read
        only); ``buffers`` the staging views with the same shapes and dtypes.
        ``packed`` (optional) is the same staging slot as ``[S, row_bytes]``
        uint8 rows, which lets a peer's experts land in one message.
        """


def copy_local(
    rank_plan: RankPlan,
    weights: Sequence[torch.Tensor],
    buffers: Sequence[torch.Tensor],
) -> None:
    """Stage the experts the rank already holds (all their target slots)."""
    dst = [s for c in rank_plan.local_copies for s in c.dst_slots]
    src = [c.src_slot for c in rank_plan.local_copies for _ in c.dst_slots]
    copy_slot_runs(buffers, weights, slot_runs(dst, src))


def copy_duplicates(
    rank_plan: RankPlan, buffers: Sequence[torch.Tensor], peers: set[int] | None
) -> None:
    """Fan a received expert out from its first slot to its other slots."""
    dst, src = [], []
    for t in rank_plan.receives:
        if len(t.dst_slots) > 1 and (peers is None or t.src_rank in peers):
            dst += t.dst_slots[1:]
            src += [t.dst_slots[0]] * (len(t.dst_slots) - 1)
    if dst:
        copy_slot_runs(buffers, buffers, slot_runs(dst, src))


def row_nbytes(weights: Sequence[torch.Tensor]) -> int:
    """Bytes of one expert over all of a layer's tensors (from the shapes: no
    tensor op, which costs tens of microseconds of host time per layer)."""
    return sum(math.prod(w.shape[1:]) * w.element_size() for w in weights)


_ACCELERATOR_LIBRARY = {"cuda": "nccl", "npu": "hccl"}


def _check_name(name: str) -> None:
    if name not in TRANSPORT_NAMES:
        raise ValueError(
            f"unknown transport {name!r}; expected one of {', '.join(TRANSPORT_NAMES)}"
        )


def resolve_transport(name: str, device_type: str) -> str:
    """The transport ``name`` stands for on ``device_type`` (``auto`` resolved)."""
    _check_name(name)
    if name != "auto":
        return name
    return {"cuda": "ipc", "npu": "p2p"}.get(device_type, "gloo-staged")


def staging_backend(transport: str, device_type: str) -> str:
    """Backend of the EPLB staging group that ``transport`` needs on a device.

    ``p2p`` on an accelerator needs its own library (NCCL, HCCL): gloo sends
    no device tensors point to point. Everything else uses gloo: host tensors
    (``gloo-staged``), and ``ipc``, whose intra-node pulls need no
    communication kernels at all and whose cross-node part then goes through
    pinned host memory rather than communication kernels that would share the
    device with the forward pass's own.
    """
    resolved = resolve_transport(transport, device_type)
    if resolved == "p2p" and device_type in _ACCELERATOR_LIBRARY:
        return _ACCELERATOR_LIBRARY[device_type]
    return "gloo"


def make_transport(
    name: str,
    *,
    backend: DeviceBackend,
    group: Any,
    expert_weights: Sequence[Sequence[torch.Tensor]] | None = None,
    ranks_per_node: int | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Transport:
    """Build a transport by name; ``auto`` picks the fastest safe one.

    ``auto``: ``ipc`` on CUDA (copy engines only; cross-node through the
    group's own backend), ``p2p`` on NPU (HCCL), ``gloo-staged`` on CPU.
    ``ipc`` needs ``expert_weights`` (all layers) and ``ranks_per_node``.
    """
    _check_name(name)
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    auto = name == "auto"
    name = resolve_transport(name, backend.device.type)
    if auto and name == "ipc" and (expert_weights is None or ranks_per_node is None):
        name = "p2p"
    needed = staging_backend(name, backend.device.type)
    if group is not None and needed != "gloo" and dist.get_backend(group) != needed:
        raise ValueError(
            f"transport 'p2p' on {backend.device} needs a {needed} staging group, "
            f"got {dist.get_backend(group)} (see staging_backend())"
        )
    if name == "gloo-staged":
        from vllm.distributed.async_eplb.transports.gloo_staged import (
            GlooStagedTransport,
        )

        return GlooStagedTransport(backend, group, timeout=timeout)
    if name == "p2p":
        from vllm.distributed.async_eplb.transports.p2p import P2PTransport

        return P2PTransport(backend, group, timeout=timeout)
    from vllm.distributed.async_eplb.transports.ipc import IpcTransport

    if expert_weights is None or ranks_per_node is None:
        raise ValueError("transport 'ipc' needs expert_weights and ranks_per_node")
    return IpcTransport(backend, group, expert_weights, ranks_per_node, timeout=timeout)
