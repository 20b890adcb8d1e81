"""``EplbState``: a drop-in for vLLM's, that never stalls the engine to move experts.

vLLM's model runners (v1 ``gpu_model_runner``, v2 ``gpu/eplb_utils``) and the
spec-decode proposers use it unchanged: ``EplbState(parallel_config, device)``,
``add_model``, ``prepare_forward``, ``step``, ``rearrange``, ``start_async_loop``,
``drain_async``, ``is_async``, ``model_states``.

How one rebalance runs (async mode), all decisions on the shared step clock:

1. every ``step_interval`` steps the logical load window is summed over EP ranks
   by a non-blocking all-reduce (a "load" vote), read ``vote_delay`` steps later;
2. the new placement, its predicted gain and the transfer plans are computed on
   the planner thread from CPU copies (``plan_thread.py``);
3. while the rebalance is in flight a "ready" vote is launched a few steps after
   the previous one was read (one in flight at a time, ``NonBlockingVote.
   may_launch``): per rank, planned / skip / error flags and staged layers
   (``ready_vote.py``). The vote that shows every rank planned (no skip, no
   error) submits the jobs to the staging workers, on every rank at the same
   step; later votes commit up to ``layers_per_step`` layers every rank has
   staged; a vote may also skip, or abort on every rank at once. Nothing here
   blocks on a step where nothing is decided: votes are read after they have
   completed.

Where the round stands is a ``RebalanceRound`` (``rebalance_round.py``);
``docs/architecture.md`` shows the threads and what they hand each other.

Sync mode (``use_async=False``) and profile runs move all layers at once through
the same planner and transports.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.agreement import (
    NonBlockingVote,
    VoteError,
    VoteResult,
    private_group,
)
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.ep_group import EpGroupInfo
from vllm.distributed.async_eplb.load_stats import (
    LoadWindow,
    balancedness,
    tokens_per_rank,
)
from vllm.distributed.async_eplb.maps import ExpertMaps, max_replicas_for
from vllm.distributed.async_eplb.model_state import (
    EplbCounters,
    EplbModelState,
    assert_confs_equal,
    check_model,
    check_registered_weights,
    initial_row,
    keep_recent,
)
from vllm.distributed.async_eplb.plan_thread import (
    PlannerThread,
    PlanRequest,
    compute_plans,
)
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.ready_vote import (
    ReadyReport,
    ReadyTally,
    decode_ready,
    encode_ready,
)
from vllm.distributed.async_eplb.rebalance_algo import warm_up
from vllm.distributed.async_eplb.rebalance_plan import (
    PlannedRebalance,
    mean_predicted,
)
from vllm.distributed.async_eplb.rebalance_round import RebalanceRound, RoundState
from vllm.distributed.async_eplb.replica_check import ReplicaCheck
from vllm.distributed.async_eplb.staging_groups import StagingGroups
from vllm.distributed.async_eplb.transports import make_transport, staging_backend

logger = logging.getLogger(__name__)

__all__ = ["EpGroupInfo", "EplbCounters", "EplbModelState", "EplbState"]

_ELASTIC = "elastic expert parallelism is not supported by async_eplb"
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


def _join_threads(threads: list[threading.Thread], deadline: float) -> list[str]:
    """Wait until ``deadline`` for ``threads``; names of those still alive.

    A stopped worker may leave a transport's helper thread waiting out a
    transfer it gave up on (bounded by the transfer timeout); its process
    group must outlive that wait.
    """
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


class _ConfigHashes:
    """``model_config.compute_hash()``, computed once per config object.

    vLLM calls ``prepare_forward`` on every forward and calls the plain hash
    expensive (JSON and SHA-256). Entries hold their config, so an ``id`` is
    never reused by another object while it is cached here.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, str]] = {}

    def __call__(self, model_config: Any) -> str:
        entry = self._by_id.get(id(model_config))
        if entry is not None and entry[0] is model_config:
            return entry[1]
        value = model_config.compute_hash()
        self._by_id[id(model_config)] = (model_config, value)
        return value


class EplbState:
    """EPLB of all models of one worker (main model and drafter)."""

    def __init__(
        self,
        parallel_config: Any,
        device: torch.device | str,
        *,
        ep_group: EpGroupInfo | None = None,
        config: AsyncEplbConfig | None = None,
    ) -> None:
        if getattr(parallel_config, "enable_elastic_ep", False):
            raise NotImplementedError(_ELASTIC)
        eplb_config = parallel_config.eplb_config
        for name in ("window_size", "step_interval"):
            value = getattr(eplb_config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eplb_config.{name}={value!r} must be an int >= 1")
        self.parallel_config = parallel_config
        self.device = torch.device(device)
        self.config = config or AsyncEplbConfig.from_env()
        self.is_async: bool = bool(eplb_config.use_async)
        self.model_states: dict[str, EplbModelState] = {}
        self.counters = EplbCounters()
        self.expert_load_window_size: int = eplb_config.window_size
        self.expert_rearrangement_step_interval: int = eplb_config.step_interval
        # vLLM starts 3/4 into the first interval; so do we.
        interval = self.expert_rearrangement_step_interval
        self.expert_rearrangement_step: int = max(0, interval - interval // 4)
        self.step_count = 0
        """The shared clock: incremented by every ``step()`` on every rank."""
        self.should_record_tensor: torch.Tensor | None = None
        self._config_hash = _ConfigHashes()
        self._ep_group = ep_group
        self._vote: NonBlockingVote | None = None
        self._groups = StagingGroups(None, [])
        self._backend: Any = None
        self._staging_thread: Any = None  # shared by every model's worker
        self._round = RebalanceRound(self.config.timeout_s)
        self._planner = PlannerThread("async-eplb-plan")
        self._plan_future: concurrent.futures.Future | None = None
        self._plan_loads: list[torch.Tensor] | None = None  # to plan after the step
        self._async_started = False
        self._recorder: Any = None  # VLLM_ASYNC_EPLB_RECORD, on EP rank 0
        self.replica_check = ReplicaCheck(self.config)
        # Built once: votes are collected at every step.
        self._vote_handlers = {
            "load": self._on_load_vote,
            "ready": self._on_ready_vote,
            "recover": self._on_recover_vote,
            "log": self._on_log_vote,
        }

    # -- set-up ------------------------------------------------------------
    @staticmethod
    def build_initial_global_physical_to_logical_map(
        num_routed_experts: int, num_redundant_experts: int
    ) -> Sequence[int]:
        """Initial ``phy2log`` row (vLLM's weight loader relies on it)."""
        return initial_row(num_routed_experts, num_redundant_experts)

    @property
    def ep(self) -> EpGroupInfo:
        if self._ep_group is None:
            self._ep_group = EpGroupInfo.from_vllm()
        return self._ep_group

    def _ensure_groups(self) -> None:
        """Create the vote and staging groups (collective: all ranks, add_model)."""
        if self._vote is not None:
            return
        ep = self.ep
        vote_group = private_group(ep.ranks, ep.all_rank_lists)
        backend = staging_backend(self.config.transport, torch.device(self.device).type)
        self._groups = StagingGroups.create(
            lambda: private_group(ep.ranks, ep.all_rank_lists, backend)
        )
        self._vote = NonBlockingVote(
            vote_group, self.config.vote_delay, self.config.timeout_s
        )

    def add_model(
        self, model: Any, model_config: Any, model_name: str | None = None
    ) -> None:
        """Register a MoE model: allocate maps, load window, staging buffer.

        Called once per MoE model, the speculative drafter included. As
        vLLM's ``MixtureOfExperts`` protocol has it, ``model.expert_weights``
        exists only once ``model.set_eplb_state`` has run: everything is
        checked on the layers' own weights first, so a refused model is left
        as it was found.
        """
        from vllm.distributed.async_eplb.device import DeviceBackend
        from vllm.distributed.async_eplb.staging import StagingBuffer

        initial, layer_weights = self._check_model(model)
        self._ensure_groups()
        name = model_name or getattr(model_config, "model", type(model).__name__)
        warm = self._plan_warm_start(model, name, initial)
        maps = ExpertMaps(
            initial,
            model.num_logical_experts,
            max_replicas_for(model.num_redundant_experts),
            device=self.device,
        )
        load_pass = torch.zeros(
            model.num_moe_layers,
            model.num_physical_experts,
            dtype=torch.int32,
            device=self.device,
        )
        window = LoadWindow(
            self.expert_load_window_size, maps.phy2log, model.num_logical_experts
        )
        num_ubatches = max(1, getattr(self.parallel_config, "num_ubatches", 1) or 1)
        unpadded = [
            torch.tensor(0, dtype=torch.int32, device=self.device)
            for _ in range(num_ubatches)
        ]
        model.set_eplb_state(load_pass, maps.log2phy, maps.logcnt)
        check_registered_weights(model, layer_weights)
        self._propagate_shared_tensors(model, unpadded)
        state = EplbModelState(
            model,
            model_name or getattr(model_config, "model", type(model).__name__),
            maps,
            load_pass,
            window,
            unpadded,
        )
        if self._backend is None:
            self._backend = DeviceBackend.for_device(self.device)
        # Allocated now, before vLLM profiles memory, so the profile sees it.
        state.buffer = StagingBuffer(model.expert_weights[0], self._backend)
        state.transport = self._new_transport(state)
        # Before anything reads or moves experts: replicas the loader left
        # stale are found and healed (collective, no vote in flight yet).
        self.replica_check.at_add_model(state, self.ep, self._vote.group, self._backend)
        self._warm_start_and_record(state, warm)
        if self.is_async:
            state.worker = self._new_worker(state)
        self.model_states[self._config_hash(model_config)] = state

    def _new_transport(self, state: EplbModelState) -> Any:
        return make_transport(
            self.config.transport,
            backend=self._backend,
            group=self._groups.current,
            expert_weights=state.model.expert_weights,
            ranks_per_node=self.ep.ranks_per_node,
            timeout=self.config.timeout_s,
        )

    def _new_worker(self, state: EplbModelState) -> Any:
        """A staging worker for ``state`` on the current staging thread.

        Every model shares one thread, so their transfers run in one order,
        the same on every rank (see ``worker.py``).
        """
        from vllm.distributed.async_eplb.worker import StagingThread, StagingWorker

        if self._staging_thread is None:
            self._staging_thread = StagingThread(self._backend, rank=self.ep.rank)
        return StagingWorker(
            state.model.expert_weights,
            state.buffer,
            state.transport,
            self._backend,
            rank=self.ep.rank,
            thread=self._staging_thread,
        )

    def validate_ep_configuration(self, new_model: Any) -> None:
        """vLLM's check that ``new_model`` has the registered models' experts.

        Raises ``ExpertGeometryMismatch`` (a ``RuntimeError``, as vLLM's).
        """
        registered = next(iter(self.model_states.values()), None)
        if registered is not None:
            assert_confs_equal(registered.model, new_model)

    assert_confs_equal = staticmethod(assert_confs_equal)

    def _check_model(self, model: Any) -> tuple[torch.Tensor, list]:
        registered = next(iter(self.model_states.values()), None)
        return check_model(
            model,
            registered=registered.model if registered is not None else None,
            configured_redundant=getattr(
                self.parallel_config.eplb_config, "num_redundant_experts", None
            ),
            num_ranks=self.ep.world_size,
        )

    def _propagate_shared_tensors(
        self, model: Any, num_unpadded_tokens_tensors: list[torch.Tensor]
    ) -> None:
        """Give vLLM's per-layer ``EplbLayerState`` the shared scalar tensors.

        We record every step (the window is a ring), so the flag stays True.
        """
        if self.should_record_tensor is None:
            self.should_record_tensor = torch.ones(
                (), dtype=torch.bool, device=self.device
            )
        for layer in getattr(model, "moe_layers", ()):
            layer_state = getattr(layer, "eplb_state", None)
            if layer_state is not None and hasattr(layer_state, "should_record_tensor"):
                layer_state.should_record_tensor = self.should_record_tensor
                layer_state.num_unpadded_tokens_tensors = num_unpadded_tokens_tensors

    def start_async_loop(
        self, rank_mapping: dict[int, int] | None = None, is_profile: bool = False
    ) -> None:
        """Start the staging workers (async mode only)."""
        if rank_mapping is not None:
            raise NotImplementedError(_ELASTIC)
        if not self.is_async or self._async_started:
            return
        for state in self.model_states.values():
            state.worker.start()
        self._async_started = True

    # -- per step -----------------------------------------------------------
    def prepare_forward(
        self,
        model_config: Any,
        num_unpadded_tokens: int,
        ubatch_slices: list | None = None,
    ) -> None:
        """Fill the per-(u)batch count of real tokens the router reads."""
        state = self.model_states.get(self._config_hash(model_config))
        if state is None:
            return
        tensors = state.num_unpadded_tokens_tensors
        if ubatch_slices is None:
            tensors[0].fill_(num_unpadded_tokens)
            return
        for i, ubatch in enumerate(ubatch_slices):
            span = ubatch.token_slice
            tensors[i].fill_(max(0, min(num_unpadded_tokens, span.stop) - span.start))

    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        """Once per engine step on every rank, dummy steps included."""
        if self._round.state is RoundState.SHUT_DOWN:
            return
        self.replica_check.poll()  # commit digests the device has finished
        if is_profile:
            # The profile run's load is not traffic (vLLM 0.33 drops it too).
            for state in self.model_states.values():
                state.expert_load_pass.zero_()
            self.rearrange(is_profile=True)
            return
        states = list(self.model_states.values())
        log_due = (
            log_stats
            and self.expert_rearrangement_step
            % self.parallel_config.eplb_config.log_balancedness_interval
            == 0
        )
        rank_tokens = None
        log_step = self.expert_rearrangement_step
        if log_due:
            rank_tokens = [
                tokens_per_rank(
                    s.expert_load_pass.to("cpu", torch.int64), self.ep.world_size
                )
                for s in states
            ]
        for state in states:
            if not is_dummy:
                # Stored with the version of the map this forward pass ran under.
                state.window.record(state.expert_load_pass)
            state.expert_load_pass.zero_()
        self.step_count += 1
        self.expert_rearrangement_step += 1

        if self.is_async:
            self._collect_votes()
        interval_due = (
            self.expert_rearrangement_step >= self.expert_rearrangement_step_interval
        )
        if interval_due and self._round.state is RoundState.IDLE:
            self.expert_rearrangement_step = 0
            self.rearrange()
        elif interval_due and self._round.state is RoundState.OFF:
            self.expert_rearrangement_step = 0
            if self.ep.rank == 0:
                logger.warning(
                    "async EPLB: expert rebalancing is OFF (%s); serving on the "
                    "current placement",
                    self.counters.disabled_cause,
                )
        if self.is_async and self._round.state in _VOTING:
            # One ready vote in flight, launched a few steps after the last read.
            if self._vote.may_launch(self.step_count, "ready"):
                self._launch_ready_vote()
        elif self._round.state is RoundState.RECOVERING:
            # Abandoned receives may still land in the staging buffer, which
            # the rebuilt workers reuse: wait for them too.
            stopped = all(
                (s.worker is None or not s.worker.is_alive())
                and (s.transport is None or s.transport.in_flight() == 0)
                for s in self.model_states.values()
            )
            self._launch("recover", torch.tensor([int(stopped)]), self._round.epoch)
        if rank_tokens is not None:
            self._launch(
                "log",
                torch.cat([t.reshape(-1) for t in rank_tokens]),
                (log_step, [t.shape for t in rank_tokens]),
            )
            if not self.is_async:
                self._collect_votes()
        self._start_planning()

    def _start_planning(self) -> None:
        """Hand a load vote's sum to the planning thread, once the step is done.

        Submitted mid-step, the planner's Python took the GIL from the rest of
        that step (2-8 ms on the H200 host, the slowest step of a rebalance);
        at the end it runs beside the forward pass instead.
        """
        if self._plan_loads is not None:
            loads, self._plan_loads = self._plan_loads, None
            self._plan_future = self._planner.submit(self._plan_request(loads))

    def _launch(self, kind: str, payload: torch.Tensor, context: Any) -> None:
        assert self._vote is not None
        self._vote.launch(self.step_count, kind, payload, context)

    def _collect_votes(self) -> None:
        assert self._vote is not None
        target = self.step_count if self.is_async else float("inf")
        try:
            results = self._vote.collect(int(min(target, 2**62)))
        except VoteError as exc:
            # Peers may have read this vote in time: nothing taken from it
            # can be agreed. This rank votes no more, so theirs fail too.
            self._turn_off(f"vote failed, nothing more can be agreed: {exc}")
            return
        for result in results:
            self._vote_handlers[result.kind](result)

    # -- load aggregation and planning -----------------------------------------
    def rearrange(
        self,
        is_profile: bool = False,
        rank_mapping: dict[int, int] | None = None,
        use_last_expert_load: bool = False,
    ) -> torch.Tensor | None:
        """Start a rebalance (async), or run one to completion (sync, profile)."""
        if rank_mapping is not None or use_last_expert_load:
            raise NotImplementedError(_ELASTIC)
        if not self.model_states:
            return None
        if is_profile:
            self._profile_transfer()
            return None
        totals = [s.window.total() for s in self.model_states.values()]
        payload = torch.cat([t.reshape(-1) for t in totals])
        if self.is_async:
            epoch = self._round.begin()
            # The last entry counts ranks whose staging worker died (idle).
            dead = torch.tensor([int(self._dead_worker() is not None)])
            payload = torch.cat([payload.to("cpu", torch.int64), dead])
            self._launch("load", payload, (epoch, [t.shape for t in totals]))
            return None
        self._round.epoch += 1  # sync mode: counted, no round state
        self._rearrange_sync(payload, [t.shape for t in totals])
        return None

    def _split(self, flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list:
        out, offset = [], 0
        for shape in shapes:
            size = int(torch.Size(shape).numel())
            out.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return out

    def _plan_request(self, loads: list[torch.Tensor]) -> PlanRequest:
        """The planner's input: CPU copies, so commits cannot change it."""
        if self._recorder is not None:  # the first model's load, summed over ranks
            self._recorder.add_window(loads[0])
        states = list(self.model_states.values())
        return PlanRequest.of(
            [s.maps.phy2log for s in states],
            loads,
            [s.model.num_expert_groups for s in states],
            num_ranks=self.ep.world_size,
            ranks_per_node=self.ep.ranks_per_node,
            policy=self.config.policy,
        )

    def _gain_too_small(self, plans: list[PlannedRebalance]) -> bool:
        old, new = mean_predicted(plans)
        self.counters.last_predicted = (old, new)
        return new - old < self.config.min_gain

    def _on_load_vote(self, result: VoteResult) -> None:
        epoch, shapes = result.context
        if (
            epoch != self._round.epoch
            or self._round.state is not RoundState.AGGREGATING
        ):
            return
        dead = int(result.total[-1])
        if dead:
            self._disable(dead)
            return
        self._round.start_planning()
        self._plan_loads = self._split(result.total[:-1], shapes)  # end of step

    # -- async staging, vote and commit -----------------------------------------
    def _poll_local_plan(self) -> tuple[bool, bool]:
        """(planned, skip) for this rank.

        Jobs are not submitted here: a rank that failed to plan would leave
        its peers waiting for its messages. They are submitted at the step
        whose vote shows every rank planned, no skip and no error.
        """
        r = self._round
        future = self._plan_future
        if r.state is RoundState.PLANNING and future is not None and future.done():
            try:
                plans = future.result()
            except Exception as exc:  # reported through the vote, logged once
                r.fail(f"placement failed: {exc!r}")
            else:
                r.planned(plans, skip=self._gain_too_small(plans))
        elif r.plan_overdue():
            self._abandon_planner()
        return r.state is not RoundState.PLANNING, r.state is RoundState.SKIPPING

    def _abandon_planner(self) -> None:
        """The plan is past its deadline: report it, plan on a fresh thread."""
        self._round.fail(
            f"placement not finished after {self.config.timeout_s:.1f} s "
            "(planner thread abandoned)"
        )
        self._plan_future = None
        self._planner.abandon()

    def _submit(self, plans: list[PlannedRebalance]) -> None:
        if not self._async_started:
            self.start_async_loop()
        for state, plan in zip(self.model_states.values(), plans, strict=True):
            state.plan = plan
            state.pending_layers = plan.changed_layers
            state.harvested = False
            if state.pending_layers:
                jobs = {i: plan.plans[i] for i in state.pending_layers}
                rows = {i: plan.new_phy2log[i] for i in jobs}
                # The worker prepares the maps on the device while staging.
                try:
                    state.worker.submit(
                        self._round.epoch, jobs, maps=state.maps, new_rows=rows
                    )
                except RuntimeError as exc:  # a dead worker: the next vote aborts
                    self._round.fail(f"staging worker refused the job: {exc}", exc)

    def _workers_idle(self) -> bool:
        """No worker thread is still inside a layer of an earlier (aborted) job.

        Peers of a failed rank finish or time out of the layer they were
        staging; a new job must not start before, or its messages could meet
        that layer's.
        """
        for s in self.model_states.values():
            if s.transport is not None and s.transport.in_flight():
                return False
            status = None if s.worker is None else s.worker.status()
            if status is not None and (status.busy or not status.idle):
                return False
        return True

    def _launch_ready_vote(self) -> None:
        r = self._round
        planned, skip = self._poll_local_plan()
        # Report "planned" only once this rank could start staging right away.
        waiting_idle = r.state is RoundState.PLANNED and not self._workers_idle()
        planned = planned and not waiting_idle
        states = list(self.model_states.values())
        staged_by_model: list[tuple[int, ...]] = []
        staged_any = False
        for state in states:
            staged_by_model.append(())
            if state.worker is None:
                continue
            status = state.worker.status()
            # An error before this job was submitted belongs to an aborted job.
            if status.error is not None and r.state is RoundState.STAGING:
                r.fail(f"staging worker failed: {status.error}", status.error)
            staged = [i for i in status.staged if i in state.pending_layers]
            staged_by_model[-1] = tuple(staged)
            staged_any = staged_any or bool(staged)
        busy = any(s.pending_layers for s in states) or waiting_idle
        if r.stalled(progressed=staged_any or not busy) and r.local_error is None:
            r.fail(self._stall_cause())
        report = ReadyReport(
            error=r.local_error is not None,
            planned=planned,
            skip=skip,
            dead=self._dead_worker() is not None,
            staged=tuple(staged_by_model),
        )
        payload = encode_ready(report, self._layers_per_model())
        self._launch("ready", torch.tensor(payload, dtype=torch.int64), r.epoch)

    def _layers_per_model(self) -> list[int]:
        return [s.model.num_moe_layers for s in self.model_states.values()]

    def _stall_cause(self) -> str:
        """Why this rank gives up waiting; names the ranks its transfers wait for."""
        waiting = sorted(
            {
                peer
                for state in self.model_states.values()
                if state.worker is not None
                for peer in state.worker.waiting_for()
            }
        )
        cause = f"no staging progress for {self.config.timeout_s:.1f} s"
        if waiting:
            cause += f" (transfers waiting for EP ranks {waiting})"
        return cause

    def _on_ready_vote(self, result: VoteResult) -> None:
        r = self._round
        if result.context != r.epoch or r.state not in _VOTING:
            return
        tally = decode_ready(result.total, self._layers_per_model())
        world = self.ep.world_size
        if tally.dead > 0:
            self._disable(tally.dead)
            return
        if tally.errors > 0:
            self._abort(
                r.local_error or f"{tally.errors} other rank(s) failed",
                local=r.local_error is not None,
            )
            return
        if tally.planned < world:
            return
        skips = tally.skips
        if skips == world:
            self._finish_skip()
            return
        if skips:
            self._abort(f"ranks disagree on skipping ({skips} of {world})", local=False)
            return
        if r.state is RoundState.PLANNED:
            r.submitted()
            self._submit(r.plans)
        self._commit_ready(tally)

    def _commit_ready(self, tally: ReadyTally) -> None:
        budget = self.config.layers_per_step
        world = self.ep.world_size
        for index, state in enumerate(self.model_states.values()):
            everywhere = set(tally.staged_everywhere(index, world))
            committed = False
            for layer in list(state.pending_layers):
                if budget == 0:
                    break
                if layer not in everywhere:
                    continue
                committed = True
                assert state.plan is not None
                start = time.perf_counter()
                state.worker.commit_layer(layer, state.maps)
                elapsed = time.perf_counter() - start
                self.replica_check.committed(
                    state, layer, state.plan.plans[layer], self.ep.rank
                )
                keep_recent(self.counters.commit_seconds, [elapsed])
                self.counters.layers_committed += 1
                state.pending_layers.remove(layer)
                budget -= 1
            if committed:
                state.window.placement_changed(state.maps.phy2log)
        if all(not s.pending_layers for s in self.model_states.values()):
            self._finish_rebalance()

    def _harvest_worker_stats(self, state: EplbModelState) -> None:
        """Add the finished job's staging stats (bytes, per-layer time) once."""
        if state.worker is None or state.harvested:
            return
        status = state.worker.status()
        if status.job_id != self._round.epoch:
            return
        self.counters.bytes_moved += status.bytes_received
        keep_recent(self.counters.staging_seconds, list(status.layer_seconds))
        state.harvested = True

    def _end_epoch(self) -> None:
        """The round is over (its state already says how): clear its traces."""
        if self._round.in_flight:
            self._round.finish()
        self._plan_future = None
        self._plan_loads = None
        for state in self.model_states.values():
            state.plan = None
            state.pending_layers = []
            self._harvest_worker_stats(state)

    def _finish_rebalance(self) -> None:
        self.counters.rebalances += 1
        old, new = self.counters.last_predicted or (float("nan"), float("nan"))
        if self.ep.rank == 0:
            logger.info(
                "async EPLB: rebalance %d committed at step %d "
                "(predicted balancedness %.4f -> %.4f)",
                self._round.epoch,
                self.step_count,
                old,
                new,
            )
        self._end_epoch()

    def _finish_skip(self) -> None:
        self.counters.skips += 1
        old, new = self.counters.last_predicted or (float("nan"), float("nan"))
        if self.ep.rank == 0:
            logger.info(
                "async EPLB: skipping rebalance at step %d: predicted balancedness "
                "%.4f -> %.4f, gain below VLLM_ASYNC_EPLB_MIN_GAIN=%.4f",
                self.step_count,
                old,
                new,
                self.config.min_gain,
            )
        self._end_epoch()

    def _abort(self, cause: str, *, local: bool) -> None:
        """Drop the rest of the rebalance; committed layers stay committed.

        If staging had started, some transfer may be left half done (a peer
        waiting for a message that never comes), so the workers are stopped
        and, once every rank's are, replaced with fresh ones on a spare
        staging group (``recovering``), at a step all ranks agree on.
        """
        self.counters.aborts += 1
        self.counters.last_abort_cause = cause
        if local or self.ep.rank == 0:
            logger.error(
                "async EPLB: rebalance %d aborted at step %d on rank %d: %s; "
                "layers keep their placement, the next interval tries again",
                self._round.epoch,
                self.step_count,
                self.ep.rank,
                cause,
                exc_info=self._round.local_exc if local else None,
            )
        staging_started = self._round.state is RoundState.STAGING
        self._stop_workers(request_only=staging_started)
        self._round.abort()  # to RECOVERING if staging had started
        self._end_epoch()

    def _stop_workers(self, *, request_only: bool) -> None:
        """Drop the in-flight job; with ``request_only`` also ask threads to end.

        Not joined here: a thread may still wait on peers for up to the
        transfer timeout, and the step loop must not.
        """
        for state in self.model_states.values():
            if state.worker is None:
                continue
            state.worker.cancel()
            if request_only:
                state.worker.stop(timeout=0.0)

    def _dead_worker(self) -> BaseException | None:
        """What killed one of this rank's staging threads, if one died."""
        for state in self.model_states.values():
            if state.worker is not None and state.worker.death is not None:
                return state.worker.death
        return None

    def _disable(self, dead_ranks: int) -> None:
        """Turn rebalancing off on every rank (same vote, same step).

        A dead staging thread is a bug, not a transfer failure: rather than
        restart into it again, serving goes on with the current placement,
        and the counters and an error log line on every rank say so.
        """
        death = self._dead_worker()
        where = f"on this rank: {death!r}" if death else "on another rank"
        cause = f"staging worker thread died on {dead_ranks} rank(s) ({where})"
        self.counters.worker_deaths += dead_ranks
        self._turn_off(cause)

    def _turn_off(self, cause: str) -> None:
        self.counters.balancing_enabled = False
        self.counters.disabled_cause = cause
        logger.error(
            "async EPLB: expert rebalancing is OFF from step %d on rank %d: %s; "
            "serving continues on the current placement",
            self.step_count,
            self.ep.rank,
            cause,
        )
        self._stop_workers(request_only=True)
        if self._round.state is not RoundState.OFF:
            self._round.turn_off()
        self._end_epoch()

    def _on_recover_vote(self, result: VoteResult) -> None:
        r = self._round
        if result.context != r.epoch or r.state is not RoundState.RECOVERING:
            return
        if int(result.total[0]) < self.ep.world_size:
            return  # some rank's worker is still inside a transfer
        if not self._groups.replace():
            self._turn_off(
                "no spare staging group left after repeated transfer failures"
            )
            return
        self._staging_thread = None  # the old one has stopped: a fresh one
        for state in self.model_states.values():
            state.transport = self._new_transport(state)
            state.worker = self._new_worker(state)
            if self._async_started:
                state.worker.start()
        self._round.recovered()

    def _on_log_vote(self, result: VoteResult) -> None:
        rearrangement_step, shapes = result.context
        remaining = max(0, self.expert_rearrangement_step_interval - rearrangement_step)
        for state, rank_tokens in zip(
            self.model_states.values(), self._split(result.total, shapes), strict=True
        ):
            try:
                avg, peak, value = balancedness(rank_tokens)
            except ValueError as exc:  # bad load from the router: say so, go on
                logger.warning("async EPLB: not logging balancedness: %s", exc)
                continue
            self.counters.last_balancedness = value
            if self.ep.rank == 0:
                logger.info(
                    "EPLB step: %d for model %s: avg_tokens=%.2f, "
                    "max_tokens=%d, balancedness=%.4f, "
                    "steps until the next rearrangement: %d",
                    rearrangement_step,
                    state.model_name,
                    avg,
                    int(peak),
                    value,
                    remaining,
                )

    # -- sync mode and profile ---------------------------------------------------
    def _rearrange_sync(self, payload: torch.Tensor, shapes: list) -> None:
        """All layers at once, blocking (``use_async=False``)."""
        assert self._vote is not None
        payload = payload.to("cpu", torch.int64)  # the vote group is gloo
        if self._vote.group is not None:
            dist.all_reduce(payload, group=self._vote.group)
        plans = compute_plans(self._plan_request(self._split(payload, shapes)))
        if self._gain_too_small(plans):
            self._finish_skip()
            return
        start = time.perf_counter()
        for state, plan in zip(self.model_states.values(), plans, strict=True):
            for layer in plan.changed_layers:
                self._move_layer_now(
                    state, layer, plan.plans[layer], plan.new_phy2log[layer]
                )
            if plan.changed_layers:
                state.window.placement_changed(state.maps.phy2log)
        self.counters.rebalances += 1
        if self.ep.rank == 0:
            old, new = self.counters.last_predicted or (0.0, 0.0)
            logger.info(
                "async EPLB (sync mode): rearranged experts in %.3f s "
                "(predicted balancedness %.4f -> %.4f)",
                time.perf_counter() - start,
                old,
                new,
            )

    def _move_layer_now(
        self,
        state: EplbModelState,
        layer: int,
        plan: LayerPlan,
        new_row: torch.Tensor | None,
    ) -> None:
        """Stage one layer on this thread; commit it unless ``new_row`` is None."""
        from vllm.distributed.async_eplb.staging import copy_slot_runs, slot_runs

        start = time.perf_counter()
        buffers = state.buffer.slot(0)
        weights = state.model.expert_weights[layer]
        received = state.transport.stage_layer(
            plan, self.ep.rank, weights, buffers, packed=state.buffer.packed(0)
        )
        self._backend.synchronize()
        self.counters.bytes_moved += int(received)
        keep_recent(self.counters.staging_seconds, [time.perf_counter() - start])
        # Peers may read our old rows until they are done: wait for all of them.
        if self._vote is not None and self._vote.group is not None:
            dist.barrier(group=self._vote.group)
        if new_row is None:
            return
        start = time.perf_counter()
        changed = plan.ranks[self.ep.rank].changed_slots
        copy_slot_runs(weights, buffers, slot_runs(changed, changed))
        state.maps.commit_layer(layer, new_row.to(self.device))
        self._backend.synchronize()
        keep_recent(self.counters.commit_seconds, [time.perf_counter() - start])
        self.counters.layers_committed += 1
        self.replica_check.committed(state, layer, plan, self.ep.rank)

    def _profile_transfer(self) -> None:
        """Move a worst-case layer into the staging buffer (no commit).

        Every slot changes and every expert comes from another rank, so the
        transport's buffers are allocated while vLLM profiles memory.
        """
        if self._round.state is not RoundState.IDLE:
            return
        world = self.ep.world_size
        warm_up(self.config.policy)  # JIT now, not mid-serving
        # Ranks leave the compilation seconds apart on a cold cache; the profile
        # run may block, so line them up before the transfer, whose waits
        # would otherwise time out on the slowest rank.
        if self._vote is not None and self._vote.group is not None:
            dist.barrier(group=self._vote.group)
        for state in self.model_states.values():
            old = state.maps.phy2log[0].to("cpu")
            slots = state.model.num_local_physical_experts
            new = torch.roll(old, shifts=slots if world > 1 else 1)
            plan = plan_layers(old[None], new[None], world, self.ep.ranks_per_node)[0]
            self._move_layer_now(state, 0, plan, None)

    # -- warm start and recording (warm_start.py, recording.py) ----------------------
    def _plan_warm_start(self, model: Any, name: str, initial: torch.Tensor) -> Any:
        """The agreed target of ``VLLM_ASYNC_EPLB_INIT_PLACEMENT`` (collective).

        Only for the first model: a MoE drafter starts from its loaded placement.
        """
        from vllm.distributed.async_eplb.warm_start import (
            agreed_warm_start,
            geometry_of,
        )

        if self.config.init_placement is None or self.model_states:
            return None
        assert self._vote is not None
        return agreed_warm_start(
            self.config.init_placement,
            geometry_of(model, name, self.ep.world_size),
            initial,
            self.ep,
            self._vote.group,
            num_groups=model.num_expert_groups,
            ranks_per_node=self.ep.ranks_per_node,
            policy=self.config.policy,
        )

    def _warm_start_and_record(self, state: EplbModelState, warm: Any) -> None:
        """Move to the warm-start placement, before the first forward; and, for
        the first model on EP rank 0, start ``VLLM_ASYNC_EPLB_RECORD``."""
        from vllm.distributed.async_eplb.recording import LoadRecorder, recording_meta

        if warm is not None:
            for layer in warm.changed_layers:
                plan, row = warm.plans[layer], warm.target[layer]
                self._move_layer_now(state, layer, plan, row)
            state.window.placement_changed(state.maps.phy2log)
            if self.ep.rank == 0:
                logger.info(
                    "async EPLB: warm start from the %s: %d layers moved",
                    warm.description,
                    len(warm.changed_layers),
                )
        if self.config.record and not self.model_states and self.ep.rank == 0:
            meta = recording_meta(
                state.model,
                state.model_name,
                self.ep.world_size,
                policy=self.config.policy,
                window_size=self.expert_load_window_size,
                step_interval=self.expert_rearrangement_step_interval,
            )
            self._recorder = LoadRecorder(
                self.config.record, meta, placement=lambda: state.maps.phy2log
            )

    # -- shutdown and elastic EP -----------------------------------------------------
    def drain_async(self) -> None:
        """Stop an in-flight rebalance on every rank (callers run it in lockstep)."""
        if not self.is_async or self._vote is None:
            return
        self._vote.drain()
        for state in self.model_states.values():
            if state.worker is not None:
                state.worker.cancel()
        self._end_epoch()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the threads, free the staging memory and our process groups.

        Every rank calls it (the engine shuts all ranks down), also in the
        middle of a rebalance: workers end after the layer they are in, which
        their peers are finishing too. A worker still inside a transfer after
        ``timeout`` seconds keeps its staging group alive (destroying a group
        under a waiting thread is unsafe); it is a daemon and cannot block
        the process's exit. ``step()`` does nothing afterwards.
        """
        if self._round.state is RoundState.SHUT_DOWN:
            return
        self._round.shut_down()
        if self._recorder is not None:
            self._recorder.close()
        workers = [s.worker for s in self.model_states.values() if s.worker]
        for worker in workers:
            worker.stop(timeout=0.0)
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.stop(timeout=max(0.0, deadline - time.monotonic()))
        self._planner.stop(max(0.0, deadline - time.monotonic()))
        stuck = _join_threads(self._own_threads(), deadline)
        if stuck:
            logger.warning(
                "async EPLB: threads %s still inside a transfer %.1f s after "
                "shutdown; their process groups are left to the process exit",
                stuck,
                timeout,
            )
        for state in self.model_states.values():
            state.worker = state.transport = state.buffer = None
            state.plan = None
            state.pending_layers = []
        self._destroy_groups(keep_staging=bool(stuck))

    def _own_threads(self) -> list[threading.Thread]:
        """This instance's threads that may wait on peers: staging, waiters."""
        threads = []
        if self._staging_thread is not None and self._staging_thread.thread:
            threads.append(self._staging_thread.thread)
        for state in self.model_states.values():
            if state.transport is not None:
                threads += state.transport.helper_threads()
        return threads

    def _destroy_groups(self, *, keep_staging: bool) -> None:
        """Destroy the private gloo groups (local: no collective needed).

        Votes still in flight are waited for first (every rank launched them,
        within the vote timeout); a group with a stuck vote is left alone.
        """
        groups = self._groups.release(keep_in_use=keep_staging)
        if self._vote is not None:
            with contextlib.suppress(VoteError):  # failed: said below
                self._vote.drain()
            failed = self._vote.failed
            if failed is None:
                groups.append(self._vote.group)
            else:
                logger.warning("async EPLB: vote group left open: %s", failed)
        self._vote = None
        if not dist.is_initialized():
            return  # the world (and every group in it) is already gone
        for group in groups:
            if group is not None:
                dist.destroy_process_group(group)

    def update_mapping(self, model_config: Any, expanded_physical_to_logical: Any):
        raise NotImplementedError(_ELASTIC)

    @classmethod
    def from_mapping(cls, *args: Any, **kwargs: Any) -> EplbState:
        raise NotImplementedError(_ELASTIC)

    def reconfigure_physical_expert_slots(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_ELASTIC)

    def create_communicator(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(_ELASTIC)

    def update_communicator(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(_ELASTIC)
