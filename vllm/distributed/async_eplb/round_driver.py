"""Drives each rebalance round through its votes (async mode).

The façade says when a round begins (every ``step_interval`` steps) and when
a step ends; this object owns the :class:`RebalanceRound` and the planner
thread, reports this rank's readiness in the ready votes, submits the jobs at
the step whose vote shows every rank planned, commits the layers every rank
has staged, and ends a round (committed, skipped, aborted, turned off) only
from what a vote says, so every rank ends it at the same step.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from vllm.distributed.async_eplb.agreement import VoteError, VoteResult
from vllm.distributed.async_eplb.eplb_parts import EplbParts, split_flat
from vllm.distributed.async_eplb.model_state import EplbModelState, keep_recent
from vllm.distributed.async_eplb.plan_thread import PlannerThread
from vllm.distributed.async_eplb.ready_vote import (
    ReadyReport,
    ReadyTally,
    decode_ready,
    encode_ready,
)
from vllm.distributed.async_eplb.rebalance_round import RebalanceRound, RoundState
from vllm.distributed.async_eplb.staging_fleet import StagingFleet

__all__ = ["RoundDriver"]

logger = logging.getLogger(__name__)

# A round between its plan and its end: ready votes are launched.
_VOTING = frozenset(
    {
        RoundState.PLANNING,
        RoundState.PLANNED,
        RoundState.SKIPPING,
        RoundState.FAILED,
        RoundState.STAGING,
    }
)


class RoundDriver:
    """One ``EplbState``'s rounds: votes in, jobs and commits out."""

    def __init__(
        self,
        parts: EplbParts,
        fleet: StagingFleet,
        rnd: RebalanceRound,
        clock: Callable[[], int],
        on_log_vote: Callable[[VoteResult], None],
    ) -> None:
        self.parts = parts
        self.fleet = fleet
        self.round = rnd
        self._clock = clock  # the façade's step counter
        self.planner = PlannerThread("async-eplb-plan", gate=fleet.gate)
        self._plan_future: concurrent.futures.Future | None = None
        # (loads, placements) of a load vote read this step: planned after it
        self._plan_loads: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # The summed window on its way to the host: (step, buffer, event, context)
        self._load_copy: tuple[int, torch.Tensor, Any, Any] | None = None
        self._harvested_epoch = 0
        self._handlers = {
            "load": self._on_load_vote,
            "ready": self._on_ready_vote,
            "recover": self._on_recover_vote,
            "log": on_log_vote,
        }

    # -- called by the façade ---------------------------------------------------
    def reserve_load_payload(self) -> None:
        """Allocate the load vote's pinned host buffer once now (``add_model``):
        the first pinned allocation of a size is slow, and later ones of that
        size come from the allocator's cache."""
        self._new_load_buffers()

    def _new_load_buffers(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every model's ``[L, E]`` window sum and the dead-worker flag, flat;
        and each model's ``phy2log``."""
        states, empty = self.parts.states, self.parts.backend.empty_pinned
        size = 1 + sum(s.window.total_numel for s in states)
        placements = [empty(s.maps.phy2log.shape, torch.int64) for s in states]
        return empty((size,), torch.int64), placements

    def begin(self, totals: list[torch.Tensor]) -> None:
        """Start a round: copy the summed load window to the host, without
        waiting for the device; its load vote is launched at the next step.

        A blocking copy here waits for the forward pass still on the device
        (on the H200s one such step of the simulated deployment took 3.7 ms,
        0.8 ms of it the engine thread's own work). The placements the load
        was summed under come along, for the planner: no commit changes them
        before the round's plan (commits belong to a round's staging).
        """
        epoch = self.round.begin()
        host, placements = self._new_load_buffers()
        for state, placement in zip(self.parts.states, placements, strict=True):
            placement.copy_(state.maps.phy2log, non_blocking=True)
        flat = (
            totals[0].reshape(-1)
            if len(totals) == 1
            else torch.cat([t.reshape(-1) for t in totals])
        )
        host[:-1].copy_(flat, non_blocking=True)
        backend = self.parts.backend
        event = backend.new_event()
        backend.record_event(event)
        context = (epoch, [t.shape for t in totals], placements)
        self._load_copy = (self._clock(), host, event, context)

    def _launch_load_vote(self) -> None:
        """The load vote, one step after ``begin`` on every rank."""
        copied = self._load_copy
        if copied is None or self._clock() <= copied[0]:
            return
        self._load_copy = None
        _, host, event, context = copied
        if (
            context[0] != self.round.epoch
            or self.round.state is not RoundState.AGGREGATING
        ):
            return
        self.parts.backend.synchronize_event(event)  # long done by now
        # The last entry counts ranks whose staging worker died (idle).
        host.numpy()[-1] = int(self.fleet.death() is not None)  # no tensor op
        self.launch("load", host, context)

    def launch(
        self, kind: str, payload: torch.Tensor | list[int], context: Any
    ) -> None:
        self.parts.vote.launch(self._clock(), kind, payload, context)

    def collect(self, *, every_vote: bool = False) -> None:
        """Act on the votes due now (``every_vote``: all launched, sync mode)."""
        target = 2**62 if every_vote else self._clock()
        try:
            results = self.parts.vote.collect(target)
        except VoteError as exc:
            # Peers may have read this vote in time: nothing taken from it
            # can be agreed. This rank votes no more, so theirs fail too.
            self.turn_off(f"vote failed, nothing more can be agreed: {exc}")
            return
        for result in results:
            self._handlers[result.kind](result)

    def launch_votes(self) -> None:
        """The load vote of a round begun last step, the ready vote of a round
        in flight, or the recover vote."""
        r = self.round
        if self._load_copy is not None:
            self._launch_load_vote()
        elif r.state in _VOTING:
            # One ready vote in flight, launched a few steps after the last
            # read; none in the step that read the load vote (its plan starts
            # only after the step, so that vote could not say "planned", and
            # the step already carries the read and the planner's request).
            if self._plan_loads is None and self.parts.vote.may_launch(
                self._clock(), "ready"
            ):
                self._launch_ready_vote()
        elif r.state is RoundState.RECOVERING:
            self.launch("recover", [int(self.fleet.stopped())], r.epoch)

    def start_planning(self) -> None:
        """Hand a load vote's sum to the planning thread, once the step is done.

        Submitted mid-step, the planner's Python took the GIL from the rest of
        that step (2-8 ms on the H200 host, the slowest step of a rebalance);
        at the end it runs beside the forward pass instead. The request is
        built from host copies only (no copy that waits for the device).
        """
        if self._plan_loads is not None:
            (loads, placements), self._plan_loads = self._plan_loads, None
            request = self.parts.plan_request(loads, placements)
            self._plan_future = self.planner.submit(request)

    def drain(self) -> None:
        """Stop an in-flight rebalance on every rank (callers run it in lockstep)."""
        self.parts.vote.drain()
        self.fleet.cancel(stop=False)
        self._end_round()

    # -- load vote and planning -------------------------------------------------
    def _on_load_vote(self, result: VoteResult) -> None:
        epoch, shapes, placements = result.context
        r = self.round
        if epoch != r.epoch or r.state is not RoundState.AGGREGATING:
            return
        dead = int(result.total[-1])
        if dead:
            self._disable(dead)
            return
        r.start_planning()
        loads = split_flat(result.total[:-1], shapes)
        self._plan_loads = (loads, placements)  # planned at the end of the step

    def _poll_local_plan(self) -> tuple[bool, bool]:
        """(planned, skip) for this rank.

        Jobs are not submitted here: a rank that failed to plan would leave
        its peers waiting for its messages. They are submitted at the step
        whose vote shows every rank planned, no skip and no error.
        """
        r = self.round
        future = self._plan_future
        if r.state is RoundState.PLANNING and future is not None and future.done():
            try:
                plans = future.result()
            except Exception as exc:  # reported through the vote, logged once
                r.fail(f"placement failed: {exc!r}")
            else:
                r.planned(plans, skip=self.parts.gain_too_small(plans))
        elif r.plan_overdue():
            # Past its deadline: report it, plan the next round on a fresh thread.
            r.fail(
                f"placement not finished after {self.parts.config.timeout_s:.1f} s "
                "(planner thread abandoned)"
            )
            self._plan_future = None
            self.planner.abandon()
        return r.state is not RoundState.PLANNING, r.state is RoundState.SKIPPING

    # -- ready vote, submit and commit ------------------------------------------
    def _launch_ready_vote(self) -> None:
        r = self.round
        planned, skip = self._poll_local_plan()
        # Report "planned" only once this rank could start staging right away.
        waiting_idle = r.state is RoundState.PLANNED and not self.fleet.idle()
        staged = self._staged_by_model()
        busy = any(r.pending) or waiting_idle
        if r.stalled(progressed=any(staged) or not busy) and r.local_error is None:
            r.fail(self._stall_cause())
        report = ReadyReport(
            error=r.local_error is not None,
            planned=planned and not waiting_idle,
            skip=skip,
            dead=self.fleet.death() is not None,
            staged=staged,
        )
        # A list: the vote builds its one tensor from it (no extra tensor ops).
        payload = encode_ready(report, self.parts.layers_per_model())
        self.launch("ready", payload, r.epoch)

    def _staged_by_model(self) -> tuple[tuple[int, ...], ...]:
        """Per model, the round's layers its worker has staged; notes a
        staging error of this round's job as the round's failure."""
        r = self.round
        staged = []
        for index, state in enumerate(self.parts.states):
            if state.worker is None:
                staged.append(())
                continue
            status = state.worker.status()
            # An error before this job was submitted belongs to an aborted job.
            if status.error is not None and r.state is RoundState.STAGING:
                r.fail(f"staging worker failed: {status.error}", status.error)
            pending = r.pending_layers(index)
            staged.append(tuple(i for i in status.staged if i in pending))
        return tuple(staged)

    def _stall_cause(self) -> str:
        """Why this rank gives up waiting; names the ranks its transfers wait for."""
        cause = f"no staging progress for {self.parts.config.timeout_s:.1f} s"
        waiting = self.fleet.waiting_for()
        if waiting:
            cause += f" (transfers waiting for EP ranks {waiting})"
        return cause

    def _on_ready_vote(self, result: VoteResult) -> None:
        r = self.round
        if result.context != r.epoch or r.state not in _VOTING:
            return
        tally = decode_ready(result.total, self.parts.layers_per_model())
        world = self.parts.ep.world_size
        if tally.dead > 0:
            self._disable(tally.dead)
        elif tally.errors > 0:
            local = r.local_error is not None
            self._abort(r.local_error or f"{tally.errors} other rank(s) failed", local)
        elif tally.planned < world:
            return
        elif tally.skips == world:
            self.parts.count_skip(self._clock())
            self._end_round()
        elif tally.skips:
            cause = f"ranks disagree on skipping ({tally.skips} of {world})"
            self._abort(cause, local=False)
        else:
            if r.state is RoundState.PLANNED:
                r.submitted([plan.changed_layers for plan in r.plans])
                self._submit()
            self._commit_ready(tally)

    def _submit(self) -> None:
        self.fleet.start()
        r = self.round
        for state, plan, pending in zip(
            self.parts.states, r.plans, r.pending, strict=True
        ):
            if not pending:
                continue
            jobs = {i: plan.plans[i] for i in pending}
            rows = {i: plan.new_phy2log[i] for i in jobs}
            # The worker prepares the maps on the device while staging.
            try:
                state.worker.submit(r.epoch, jobs, maps=state.maps, new_rows=rows)
            except RuntimeError as exc:  # a dead worker: the next vote aborts
                r.fail(f"staging worker refused the job: {exc}", exc)

    def _commit_ready(self, tally: ReadyTally) -> None:
        """Commit up to ``layers_per_step`` layers every rank has staged."""
        r = self.round
        budget = self.parts.config.layers_per_step
        world = self.parts.ep.world_size
        for index, state in enumerate(self.parts.states):
            everywhere = set(tally.staged_everywhere(index, world))
            layers = [i for i in r.pending[index] if i in everywhere][:budget]
            for layer in layers:
                self._commit_layer(index, state, layer)
            budget -= len(layers)
            if layers:
                state.window.placement_changed(state.maps.phy2log)
        if not any(r.pending):
            self._finish_rebalance()

    def _commit_layer(self, index: int, state: EplbModelState, layer: int) -> None:
        counters = self.parts.counters
        start = time.perf_counter()
        # The staging thread resumes at the end of the step (EplbState.step).
        state.worker.commit_layer(layer, state.maps, wake=False)
        elapsed = time.perf_counter() - start
        plan = self.round.plans[index].plans[layer]
        self.parts.replica_check.committed(state, layer, plan, self.parts.ep.rank)
        keep_recent(counters.commit_seconds, [elapsed])
        counters.layers_committed += 1
        self.round.layer_committed(index, layer)

    # -- endings -------------------------------------------------------------
    def _end_round(self) -> None:
        """The round is over (its state already says how): clear its traces."""
        if self.round.in_flight:
            self.round.finish()
        self._plan_future = None
        self._plan_loads = None
        self._load_copy = None
        self._harvest_worker_stats()

    def _harvest_worker_stats(self) -> None:
        """Add the round's staging stats (bytes, per-layer time), once."""
        epoch = self.round.epoch
        if self._harvested_epoch == epoch:
            return
        counters = self.parts.counters
        for state in self.parts.states:
            if state.worker is None:
                continue
            status = state.worker.status()
            if status.job_id == epoch:
                counters.bytes_moved += status.bytes_received
                keep_recent(counters.staging_seconds, list(status.layer_seconds))
        self._harvested_epoch = epoch

    def _finish_rebalance(self) -> None:
        counters = self.parts.counters
        counters.rebalances += 1
        old, new = counters.last_predicted or (float("nan"), float("nan"))
        if self.parts.ep.rank == 0:
            logger.info(
                "async EPLB: rebalance %d committed at step %d "
                "(predicted balancedness %.4f -> %.4f)",
                self.round.epoch,
                self._clock(),
                old,
                new,
            )
        self._end_round()

    def _abort(self, cause: str, local: bool) -> None:
        """Drop the rest of the rebalance; committed layers stay committed.

        If staging had started, some transfer may be left half done (a peer
        waiting for a message that never comes), so the workers are stopped
        and, once every rank's are, replaced with fresh ones on a spare
        staging group (``recovering``), at a step all ranks agree on.
        """
        counters = self.parts.counters
        counters.aborts += 1
        counters.last_abort_cause = cause
        if local or self.parts.ep.rank == 0:
            logger.error(
                "async EPLB: rebalance %d aborted at step %d on rank %d: %s; "
                "layers keep their placement, the next interval tries again",
                self.round.epoch,
                self._clock(),
                self.parts.ep.rank,
                cause,
                exc_info=self.round.local_exc if local else None,
            )
        self.fleet.cancel(stop=self.round.state is RoundState.STAGING)
        self.round.abort()  # to RECOVERING if staging had started
        self._end_round()

    def _on_recover_vote(self, result: VoteResult) -> None:
        r = self.round
        if result.context != r.epoch or r.state is not RoundState.RECOVERING:
            return
        if int(result.total[0]) < self.parts.ep.world_size:
            return  # some rank's worker is still inside a transfer
        if not self.fleet.rebuild():
            self.turn_off(
                "no spare staging group left after repeated transfer failures"
            )
            return
        r.recovered()

    def _disable(self, dead_ranks: int) -> None:
        """Turn rebalancing off on every rank (same vote, same step).

        A dead staging thread is a bug, not a transfer failure: rather than
        restart into it again, serving goes on with the current placement,
        and the counters and an error log line on every rank say so.
        """
        death = self.fleet.death()
        where = f"on this rank: {death!r}" if death else "on another rank"
        self.parts.counters.worker_deaths += dead_ranks
        self.turn_off(f"staging worker thread died on {dead_ranks} rank(s) ({where})")

    def turn_off(self, cause: str) -> None:
        """Balancing off for good on this rank; serving goes on as placed."""
        counters = self.parts.counters
        counters.balancing_enabled = False
        counters.disabled_cause = cause
        logger.error(
            "async EPLB: expert rebalancing is OFF from step %d on rank %d: %s; "
            "serving continues on the current placement",
            self._clock(),
            self.parts.ep.rank,
            cause,
        )
        self.fleet.cancel(stop=True)
        if self.round.state is not RoundState.OFF:
            self.round.turn_off()
        self._end_round()
