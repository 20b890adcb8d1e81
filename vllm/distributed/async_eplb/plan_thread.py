"""Planning off the main thread: immutable inputs in, a plan out.

The main thread hands the planner a :class:`PlanRequest` (CPU copies of each
model's placement and summed load, and the geometry), so nothing the planner
reads can change under it: commits rewrite the live maps in place. The planner
returns :class:`PlannedRebalance` objects and touches no other state.

:class:`PlannerThread` runs requests on a daemon thread. A request that never
finishes cannot be interrupted (it is CPU work inside a policy), so the caller
abandons the thread past its deadline and the next request gets a fresh one;
being a daemon, the abandoned thread cannot hold up the process's exit.
Between pieces of planning the thread passes the engine's step gate
(``step_gate.py``): it runs beside the forward pass, not inside a step.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm.distributed.async_eplb.rebalance_plan import (
    PlannedRebalance,
    hand_back_gil,
    plan_rebalance,
)
from vllm.distributed.async_eplb.step_gate import StepGate

__all__ = ["ModelPlanInput", "PlanRequest", "PlannerThread", "compute_plans"]


@dataclass(frozen=True)
class ModelPlanInput:
    """One model's planning input; the tensors are CPU copies the request owns."""

    old_phy2log: torch.Tensor
    load: torch.Tensor
    num_groups: int


@dataclass(frozen=True)
class PlanRequest:
    """Everything one rebalance's plans depend on (identical on every rank)."""

    models: tuple[ModelPlanInput, ...]
    num_ranks: int
    ranks_per_node: int
    policy: str

    @classmethod
    def of(
        cls,
        placements: list[torch.Tensor],
        loads: list[torch.Tensor],
        num_groups: list[int],
        *,
        num_ranks: int,
        ranks_per_node: int,
        policy: str,
    ) -> PlanRequest:
        """Copy ``placements`` and ``loads`` to the CPU (never views of them)."""
        models = tuple(
            ModelPlanInput(p.to("cpu", copy=True), w.to("cpu", copy=True), g)
            for p, w, g in zip(placements, loads, num_groups, strict=True)
        )
        return cls(models, num_ranks, ranks_per_node, policy)


def compute_plans(
    request: PlanRequest, pause: Callable[[], None] = hand_back_gil
) -> list[PlannedRebalance]:
    """Placement, predicted gain and transfer plans of every model (pure;
    ``pause`` runs between pieces, see ``plan_rebalance``)."""
    return [
        plan_rebalance(
            model.old_phy2log,
            model.load,
            num_groups=model.num_groups,
            num_ranks=request.num_ranks,
            ranks_per_node=request.ranks_per_node,
            policy=request.policy,
            pause=pause,
        )
        for model in request.models
    ]


_Item = tuple[PlanRequest, concurrent.futures.Future] | None


class PlannerThread:
    """Computes plans on a daemon thread, one request at a time."""

    _ids = itertools.count()

    def __init__(self, name: str, gate: StepGate | None = None) -> None:
        self.name = name
        self.gate = gate
        """The engine's step gate: planning parks there between pieces."""
        self.abandoned = 0
        """Threads given up on (each may still be inside a request)."""
        self._thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._start()  # now, not inside a serving step

    def _start(self) -> None:
        self._queue = queue.SimpleQueue()
        thread = threading.Thread(
            target=_serve,
            args=(self._queue, self._pause),
            name=f"{self.name}-{next(self._ids)}",
            daemon=True,
        )
        thread.start()
        self._thread = thread

    def _pause(self) -> None:
        """Between pieces of planning: wait out a step in progress, then hand
        the GIL to whoever waits for it."""
        if self.gate is not None:
            self.gate.wait()
        hand_back_gil()

    def submit(self, request: PlanRequest) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((request, future))
        return future

    def abandon(self) -> None:
        """Give the current thread up (it ends after its request, if ever);
        later requests run on a fresh one."""
        self._queue.put(None)
        self.abandoned += 1
        self._start()

    def stop(self, timeout: float) -> None:
        """End the current thread (joined up to ``timeout``: a request in
        progress finishes first). Abandoned ones are not waited for: they
        hold no process group, only their own CPU copies."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)


def _serve(requests: queue.SimpleQueue[_Item], pause: Callable[[], None]) -> None:
    while True:
        item = requests.get()
        if item is None:
            return
        request, future = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(compute_plans(request, pause))
        except BaseException as exc:  # handed to the main thread
            future.set_exception(exc)
