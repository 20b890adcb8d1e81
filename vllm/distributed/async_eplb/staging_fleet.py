"""This rank's staging: every model's transport and worker, their one thread,
and the staging groups they run on.

The round driver asks it questions (is every worker idle, did one die, whom
do the transfers wait for) and gives it orders (start, cancel, rebuild on a
spare group); it never touches a worker's live fields, only the snapshots
``StagingWorker.status()`` takes under the worker's lock.
"""

from __future__ import annotations

import threading
import time

from vllm.distributed.async_eplb.eplb_parts import EplbParts
from vllm.distributed.async_eplb.model_state import EplbModelState
from vllm.distributed.async_eplb.staging_groups import StagingGroups
from vllm.distributed.async_eplb.step_gate import StepGate
from vllm.distributed.async_eplb.transports import Transport, make_transport
from vllm.distributed.async_eplb.worker import StagingThread, StagingWorker

__all__ = ["StagingFleet"]


class StagingFleet:
    """Transports and staging workers of every registered model."""

    def __init__(
        self, parts: EplbParts, groups: StagingGroups, gate: StepGate | None = None
    ) -> None:
        self.parts = parts
        self.groups = groups
        self.gate = gate
        """The engine's step gate, passed to the staging thread."""
        self.thread: StagingThread | None = None
        """Shared by every model's worker (None until the first worker)."""
        self.started = False

    # -- set-up -------------------------------------------------------------
    def attach_transport(self, state: EplbModelState) -> None:
        state.transport = self._new_transport(state)

    def attach_worker(self, state: EplbModelState) -> None:
        """A staging worker for ``state`` on the shared staging thread.

        Every model shares one thread, so their transfers run in one order,
        the same on every rank (see ``worker.py``).
        """
        if self.thread is None:
            self.thread = StagingThread(
                self.parts.backend, rank=self.parts.ep.rank, gate=self.gate
            )
        state.worker = StagingWorker(
            state.model.expert_weights,
            state.buffer,
            state.transport,
            self.parts.backend,
            rank=self.parts.ep.rank,
            thread=self.thread,
        )

    def _new_transport(self, state: EplbModelState) -> Transport:
        config = self.parts.config
        return make_transport(
            config.transport,
            backend=self.parts.backend,
            group=self.groups.current,
            expert_weights=state.model.expert_weights,
            ranks_per_node=self.parts.ep.ranks_per_node,
            timeout=config.timeout_s,
        )

    def start(self) -> None:
        """Start every worker (once)."""
        if self.started:
            return
        for worker in self._workers():
            worker.start()
        self.started = True

    def _workers(self) -> list[StagingWorker]:
        return [s.worker for s in self.parts.models.values() if s.worker is not None]

    def _transports(self) -> list[Transport]:
        states = self.parts.models.values()
        return [s.transport for s in states if s.transport is not None]

    # -- questions ------------------------------------------------------------
    def death(self) -> BaseException | None:
        """What killed this rank's staging thread, if it died."""
        for worker in self._workers():
            if worker.death is not None:
                return worker.death
        return None

    def idle(self) -> bool:
        """No thread is still inside a layer of an earlier (aborted) job, and
        no abandoned receive can still land in a staging buffer.

        Peers of a failed rank finish or time out of the layer they were
        staging; a new job must not start before, or its messages could meet
        that layer's.
        """
        if any(t.in_flight() for t in self._transports()):
            return False
        for worker in self._workers():
            status = worker.status()
            if status.busy or not status.idle:
                return False
        return True

    def stopped(self) -> bool:
        """Every worker's thread ended and no abandoned receive is in flight
        (the rebuilt workers reuse the staging buffers)."""
        return not any(w.is_alive() for w in self._workers()) and not any(
            t.in_flight() for t in self._transports()
        )

    def waiting_for(self) -> list[int]:
        """EP ranks the transfers of this rank are blocked on right now."""
        return sorted({p for w in self._workers() for p in w.waiting_for()})

    def threads(self) -> list[threading.Thread]:
        """This fleet's threads that may wait on peers: staging, waiters."""
        threads = []
        if self.thread is not None and self.thread.thread is not None:
            threads.append(self.thread.thread)
        for transport in self._transports():
            threads += transport.helper_threads()
        return threads

    # -- orders -----------------------------------------------------------------
    def cancel(self, *, stop: bool) -> None:
        """Drop the in-flight jobs; with ``stop`` also ask the thread to end.

        Not joined here: a thread may still wait on peers for up to the
        transfer timeout, and the step loop must not.
        """
        for worker in self._workers():
            worker.cancel()
            if stop:
                worker.stop(timeout=0.0)

    def wake(self) -> None:
        """Let the staging thread see the commits of this step (made with
        ``wake=False``, so it resumes only once the step is done)."""
        for worker in self._workers():
            worker.wake()

    def rebuild(self) -> bool:
        """Fresh transports and workers on a spare staging group (after every
        rank's workers stopped); False if no spare group is left."""
        if not self.groups.replace():
            return False
        self.thread = None  # the old one has stopped: a fresh one
        for state in self.parts.models.values():
            self.attach_transport(state)
            self.attach_worker(state)
            if self.started:
                state.worker.start()
        return True

    def stop(self, timeout: float) -> list[str]:
        """Stop the thread, join it and the transfer waiters until ``timeout``;
        names of threads still alive then (inside a transfer)."""
        workers = self._workers()
        for worker in workers:
            worker.stop(timeout=0.0)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.stop(timeout=max(0.0, deadline - time.monotonic()))
        threads = self.threads()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]

    def release(self) -> None:
        """Drop the workers, transports and staging buffers (after ``stop``)."""
        for state in self.parts.models.values():
            state.worker = state.transport = state.buffer = None
