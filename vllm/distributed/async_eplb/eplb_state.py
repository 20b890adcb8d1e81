"""``EplbState``: a drop-in for vLLM's, that never stalls the engine to move experts.

vLLM's model runners (v1 ``gpu_model_runner``, v2 ``gpu/eplb_utils``) and the
spec-decode proposers use it unchanged: ``EplbState(parallel_config, device)``,
``add_model``, ``prepare_forward``, ``step``, ``rearrange``, ``start_async_loop``,
``drain_async``, ``is_async``, ``model_states``.

This class is the vLLM-facing façade: it keeps the step clock and vLLM's
attributes and hands the work to parts with one job each:

- ``model_setup.py``: a model's maps, load window, staging buffer, warm start;
- ``round_driver.py`` (async mode): one rebalance round through its votes.
  Every ``step_interval`` steps the load window is summed over EP ranks by a
  non-blocking all-reduce (the load vote); the planner thread computes the
  placement and transfer plans from CPU copies (``plan_thread.py``); ready
  votes (``ready_vote.py``), one in flight at a time, report per rank planned
  / skip / error and the staged layers; the vote that shows every rank
  planned submits the jobs, on every rank at the same step, later ones commit
  up to ``layers_per_step`` layers every rank has staged, or abort everywhere.
  Nothing blocks on a step where nothing is decided: votes are read after
  they have completed. Where the round stands is a ``RebalanceRound``;
- ``staging_fleet.py``: the models' transports and staging workers;
- ``sync_mover.py``: sync mode (``use_async=False``) and the profile run move
  every layer at once through the same planner and transports;
- ``balance_log.py``: vLLM's balancedness log line; ``lifecycle.py``: shutdown.

``docs/architecture.md`` shows the threads and what they hand each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from vllm.distributed.async_eplb.agreement import NonBlockingVote, private_group
from vllm.distributed.async_eplb.balance_log import BalanceLog
from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.ep_group import EpGroupInfo
from vllm.distributed.async_eplb.eplb_parts import EplbParts
from vllm.distributed.async_eplb.lifecycle import shut_down
from vllm.distributed.async_eplb.model_setup import (
    new_model_state,
    plan_start,
    warm_start_and_record,
)
from vllm.distributed.async_eplb.model_state import (
    EplbCounters,
    EplbModelState,
    assert_confs_equal,
    check_model,
    initial_row,
)
from vllm.distributed.async_eplb.rebalance_round import RebalanceRound, RoundState
from vllm.distributed.async_eplb.replica_check import ReplicaCheck
from vllm.distributed.async_eplb.round_driver import RoundDriver
from vllm.distributed.async_eplb.staging_fleet import StagingFleet
from vllm.distributed.async_eplb.staging_groups import StagingGroups
from vllm.distributed.async_eplb.step_gate import StepGate
from vllm.distributed.async_eplb.sync_mover import profile_transfer, rearrange_sync
from vllm.distributed.async_eplb.transports import staging_backend

__all__ = ["EpGroupInfo", "EplbCounters", "EplbModelState", "EplbState"]

logger = logging.getLogger(__name__)

_ELASTIC = "elastic expert parallelism is not supported by async_eplb"


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
        self.replica_check = ReplicaCheck(self.config)
        self._config_hash = _ConfigHashes()
        self._ep_group = ep_group
        self._round = RebalanceRound(self.config.timeout_s)
        self._gate = StepGate()  # closed during step(): staging waits outside it
        # Built at the first add_model (collective: the vote and staging groups).
        self._parts: EplbParts | None = None
        self._fleet: StagingFleet | None = None
        self._driver: RoundDriver | None = None
        self._balance_log: BalanceLog | None = None

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

    def _ensure_parts(self) -> EplbParts:
        """Create the vote and staging groups (collective: all ranks, add_model)
        and the parts that use them."""
        if self._parts is not None:
            return self._parts
        ep, config = self.ep, self.config
        vote_group = private_group(ep.ranks, ep.all_rank_lists)
        backend = staging_backend(config.transport, self.device.type)
        groups = StagingGroups.create(
            lambda: private_group(ep.ranks, ep.all_rank_lists, backend)
        )
        vote = NonBlockingVote(vote_group, config.vote_delay, config.timeout_s)
        parts = EplbParts(
            ep,
            config,
            self.counters,
            self.model_states,
            self.device,
            DeviceBackend.for_device(self.device),
            vote,
            self.replica_check,
        )
        self._fleet = StagingFleet(parts, groups, gate=self._gate)
        log = BalanceLog(parts, self.expert_rearrangement_step_interval)
        self._balance_log = log
        self._driver = RoundDriver(
            parts, self._fleet, self._round, lambda: self.step_count, log.on_vote
        )
        self._parts = parts
        return parts

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
        initial, layer_weights = self._check_model(model)
        parts = self._ensure_parts()
        name = model_name or getattr(model_config, "model", type(model).__name__)
        warm = plan_start(parts, model, name, initial)
        if self.should_record_tensor is None:
            self.should_record_tensor = torch.ones(
                (), dtype=torch.bool, device=self.device
            )
        state = new_model_state(
            model,
            name,
            initial,
            layer_weights,
            window_size=self.expert_load_window_size,
            num_ubatches=max(1, getattr(self.parallel_config, "num_ubatches", 1) or 1),
            should_record=self.should_record_tensor,
            device=self.device,
            backend=parts.backend,
        )
        self._fleet.attach_transport(state)
        # Before anything reads or moves experts: replicas the loader left
        # stale are found and healed (collective, no vote in flight yet).
        self.replica_check.at_add_model(state, self.ep, parts.vote.group, parts.backend)
        warm_start_and_record(
            parts,
            state,
            warm,
            window_size=self.expert_load_window_size,
            step_interval=self.expert_rearrangement_step_interval,
        )
        if self.is_async:
            self._fleet.attach_worker(state)
        self.model_states[self._config_hash(model_config)] = state
        if self.is_async:
            self._driver.reserve_load_payload()

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

    def start_async_loop(
        self, rank_mapping: dict[int, int] | None = None, is_profile: bool = False
    ) -> None:
        """Start the staging workers (async mode only)."""
        if rank_mapping is not None:
            raise NotImplementedError(_ELASTIC)
        if self.is_async and self._fleet is not None:
            self._fleet.start()

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
        """Once per engine step on every rank, dummy steps included.

        This rank's staging thread holds off its Python work meanwhile
        (``step_gate.py``), so the step does not wait for the GIL.
        """
        if self._round.state is RoundState.SHUT_DOWN:
            return
        self._gate.close()
        try:
            self._step(is_dummy, is_profile, log_stats)
            if self._driver is not None:
                # Last, and with the gate still closed: the threads woken here
                # park at it until the step is over (on the H200s a planner
                # woken after the gate opened took the GIL from the rest of
                # the step: 2.6 ms). Staging resumes after this step's commits;
                # planning starts from a load vote read in this step.
                self._driver.start_planning()
                self._fleet.wake()
        finally:
            self._gate.open()

    def _step(self, is_dummy: bool, is_profile: bool, log_stats: bool) -> None:
        self.replica_check.poll()  # commit digests the device has finished
        if is_profile:
            # The profile run's load is not traffic (vLLM 0.33 drops it too).
            for state in self.model_states.values():
                state.expert_load_pass.zero_()
            self.rearrange(is_profile=True)
            return
        log_step, log_tokens = self.expert_rearrangement_step, None
        every = self.parallel_config.eplb_config.log_balancedness_interval
        if log_stats and log_step % every == 0 and self._balance_log is not None:
            log_tokens = self._balance_log.rank_tokens()
        for state in self.model_states.values():
            if not is_dummy:
                # Stored with the version of the map this forward pass ran under.
                state.window.record(state.expert_load_pass)
            state.expert_load_pass.zero_()
        self.step_count += 1
        self.expert_rearrangement_step += 1
        driver = self._driver
        ended_now = False
        if self.is_async and driver is not None:
            in_flight = self._round.in_flight
            driver.collect()
            # A round that ends here (its last commit) leaves the next round's
            # window sum to the next step: the two never share one.
            ended_now = in_flight and not self._round.in_flight
        interval = self.expert_rearrangement_step_interval
        if ended_now:
            pass  # neither a rebalance nor its window sum in a commit's step
        elif self.expert_rearrangement_step >= interval:
            self._interval_due()
        elif (
            self.expert_rearrangement_step + 1 == interval
            and self._round.state is RoundState.IDLE
        ):
            # The next step begins a rebalance: sum its window now, but for the
            # step it records, so that its sum is one op (the window sum was
            # the heaviest part of a rebalance's first step on the H200s).
            for state in self.model_states.values():
                state.window.prefold()
        if driver is None:
            return  # no model yet
        if self.is_async:
            driver.launch_votes()
        if log_tokens is not None:
            self._balance_log.launch(self.step_count, log_step, log_tokens)
            if not self.is_async:
                driver.collect(every_vote=True)

    def _interval_due(self) -> None:
        if self._round.state is RoundState.IDLE:
            self.expert_rearrangement_step = 0
            self.rearrange()
        elif self._round.state is RoundState.OFF:
            self.expert_rearrangement_step = 0
            if self.ep.rank == 0:
                logger.warning(
                    "async EPLB: expert rebalancing is OFF (%s); serving on the "
                    "current placement",
                    self.counters.disabled_cause,
                )

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
            if self._round.state is RoundState.IDLE:
                profile_transfer(self._parts)
            return None
        totals = [s.window.total() for s in self.model_states.values()]
        if self.is_async:
            self._driver.begin(totals)
        else:
            self._round.epoch += 1  # sync mode: counted, no round state
            rearrange_sync(self._parts, totals, self.step_count)
        return None

    # -- shutdown and elastic EP -----------------------------------------------------
    def drain_async(self) -> None:
        """Stop an in-flight rebalance on every rank (callers run it in lockstep)."""
        if self.is_async and self._driver is not None:
            self._driver.drain()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop this instance's threads, free the staging memory and our
        process groups (``lifecycle.py``); ``step()`` does nothing afterwards.

        vLLM never calls it: its threads are daemons, abandoned at exit.
        """
        if self._round.state is RoundState.SHUT_DOWN:
            return
        self._round.shut_down()
        if self._parts is not None:
            shut_down(self._parts, self._fleet, self._driver, timeout)

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
