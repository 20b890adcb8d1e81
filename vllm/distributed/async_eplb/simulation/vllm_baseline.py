"""vLLM's own EplbState on the simulator's CPU ranks: every shim it needs, here.

Used only by ``--compare`` for the baseline column; the rest of the simulator
never imports vLLM. What vLLM's ``EplbState`` needs that a CPU rank lacks:

- vLLM's parallel state (``get_ep_group()``, ``get_eplb_group()``) instead of
  a bare ``torch.distributed`` world: :func:`init_process_groups` builds it on
  gloo, with EPLB enabled before the groups are made (vLLM creates its EPLB
  group only then, and refuses ``enable_eplb`` on CPU when it validates the
  config, so it is set after construction);
- ``torch.Event(enable_timing=True)``, which its synchronous ``rearrange``
  records on EP rank 0 for one log line and which the CPU backend refuses:
  :func:`cpu_event_shim` swaps in a wall-clock event for the run;
- a weight communicator that needs no device stream: ``torch_nccl`` on CPU
  tensors sends over the EPLB group's gloo CPU group (``torch_gloo`` calls
  ``torch.accelerator.current_stream()``, which fails with no accelerator);
- the model declared a ``MixtureOfExperts`` (vLLM's ``is_mixture_of_experts``
  check), with a real ``EplbLayerState`` on each layer, so vLLM allocates its
  ``should_record_tensor``; the toy router records every step, so a step whose
  load vLLM's router would not have recorded is zeroed before ``step()``.

Only sync mode runs: vLLM's async worker asserts a device index and opens a
``torch.Stream`` on the current accelerator, so it cannot run on CPU ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from vllm.distributed.async_eplb.model_state import EplbCounters
from vllm.distributed.async_eplb.simulation.compare import experts_received
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

__all__ = [
    "ASYNC_MISSING",
    "VllmBaseline",
    "available",
    "build",
    "cpu_event_shim",
    "preload",
    "process_groups",
]

ASYNC_MISSING = (
    "vLLM's async EPLB is not compared: its worker thread asserts a device "
    "index and opens a torch.Stream on the current accelerator, which CPU "
    "ranks do not have; its sync mode runs"
)


def available() -> bool:
    """vLLM (not only this project's namespace package) is importable."""
    try:
        return importlib.util.find_spec("vllm.distributed.eplb.eplb_state") is not None
    except (ImportError, ValueError):
        return False


def preload() -> None:
    """Import what the baseline's ranks use, in the parent before it forks
    them: vLLM's imports take seconds (40 s on a loaded 2-core machine).
    vLLM's own log shows errors only (its CPU warnings say nothing about EPLB),
    unless ``VLLM_LOGGING_LEVEL`` says otherwise."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import vllm.config
    import vllm.distributed.eplb.eplb_state
    import vllm.distributed.parallel_state
    import vllm.model_executor.models.interfaces  # noqa: F401


def _parallel_config(config: Any) -> Any:
    """vLLM's ParallelConfig, every rank one EP rank, EPLB not yet on."""
    from vllm.config import ParallelConfig

    return ParallelConfig(
        tensor_parallel_size=config.ranks, enable_expert_parallel=True
    )


def _enable_eplb(parallel_config: Any, config: Any) -> Any:
    """EPLB on: sync mode, vLLM's default policy, the run's window and interval.

    Set after construction, and after any ``VllmConfig`` holding it is
    built: vLLM refuses EPLB on CPU when it validates either.
    """
    from vllm.config import EPLBConfig

    parallel_config.eplb_config = EPLBConfig(
        window_size=config.window,
        step_interval=config.step_interval,
        num_redundant_experts=config.redundant,
        use_async=False,
        policy="default",
        communicator="torch_nccl",
    )
    parallel_config.enable_eplb = True
    return parallel_config


@contextlib.contextmanager
def process_groups(config: Any, rank: int, init_method: str) -> Iterator[None]:
    """vLLM's world, TP (= EP) and EPLB groups on gloo, with the CPU event
    shim, for the life of one baseline rank."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
        ensure_model_parallel_initialized,
        init_distributed_environment,
    )

    # Parallel runs on one machine must not share vLLM's named resources.
    ident = hashlib.sha256(init_method.encode()).hexdigest()[:12]
    os.environ.setdefault("VLLM_DIST_IDENT", f"eplb-sim-{ident}")
    vllm_config = VllmConfig(parallel_config=_parallel_config(config))
    _enable_eplb(vllm_config.parallel_config, config)
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            config.ranks, rank, init_method, rank, backend="gloo"
        )
        ensure_model_parallel_initialized(config.ranks, 1)
    try:
        with cpu_event_shim():
            yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


class _WallClockEvent:
    """``torch.Event`` for CPU ranks: host wall-clock timing only."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self._time = 0.0

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end: _WallClockEvent) -> float:
        return 1000.0 * (end._time - self._time)


def _cpu_events_refused() -> bool:
    try:
        torch.Event(enable_timing=True).record()
    except RuntimeError:
        return True
    return False


@contextlib.contextmanager
def cpu_event_shim() -> Iterator[None]:
    """``torch.Event`` replaced by a wall-clock event while the CPU backend
    refuses events (a rank process of the baseline; restored on exit)."""
    if not _cpu_events_refused():
        yield
        return
    real = torch.Event
    torch.Event = _WallClockEvent  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        torch.Event = real  # type: ignore[misc]


def _toy_class() -> type[ToyMoE]:
    from vllm.model_executor.models.interfaces import MixtureOfExperts

    class VllmToyMoE(ToyMoE, MixtureOfExperts):
        """The toy declared a ``MixtureOfExperts``, as vLLM's model classes
        are; ToyMoE's own protocol methods come first in the MRO."""

    return VllmToyMoE


def _attach_layer_states(model: ToyMoE) -> None:
    """A vLLM ``EplbLayerState`` on each layer, kept up to date, as FusedMoE has."""
    from vllm.distributed.eplb.eplb_state import EplbLayerState

    for layer in model.moe_layers:
        layer.eplb_state = EplbLayerState()  # type: ignore[attr-defined]
        plain = layer.set_eplb_state

        def set_state(
            moe_layer_idx: int,
            expert_load_view: torch.Tensor,
            logical_to_physical_map: torch.Tensor,
            logical_replica_count: torch.Tensor,
            layer: Any = layer,
            plain: Any = plain,
        ) -> None:
            args = (
                moe_layer_idx,
                expert_load_view,
                logical_to_physical_map,
                logical_replica_count,
            )
            plain(*args)
            layer.eplb_state.set_layer_state(*args)

        layer.set_eplb_state = set_state  # type: ignore[method-assign]


class _ModelConfig:
    """What vLLM's EplbState reads of ModelConfig: a name and a hash (a plain
    object: vLLM caches the hash by the object's identity)."""

    def __init__(self, name: str) -> None:
        self.model = name

    def compute_hash(self) -> str:
        return hashlib.sha256(self.model.encode()).hexdigest()


class VllmBaseline:
    """vLLM's EplbState behind the surface the simulator's loop uses: the same
    calls (``add_model``, ``prepare_forward``, ``step``, ``shutdown``) and the
    counters our EplbState keeps (rebalances, bytes this rank received)."""

    is_async = False

    def __init__(self, parallel_config: Any, device: torch.device) -> None:
        from vllm.distributed.eplb import eplb_state as vllm_module

        cls = vllm_module.EplbState
        # Our vLLM plugin may have replaced the name: take vLLM's own class.
        cls = getattr(cls, "vllm_eplb_state", None) or cls
        if cls.__module__ != vllm_module.__name__:
            raise RuntimeError(f"vLLM's EplbState is not available (found {cls})")
        self.inner = cls(parallel_config, device)
        self.counters = EplbCounters()
        self._bytes_per_expert = 0

    @property
    def model_states(self) -> dict[str, Any]:
        return self.inner.model_states

    @property
    def expert_rearrangement_step(self) -> int:
        return self.inner.expert_rearrangement_step

    def add_model(self, model: ToyMoE, model_config: _ModelConfig) -> None:
        self.inner.add_model(model, model_config)
        self._bytes_per_expert = sum(t[0].nbytes for t in model.expert_weights[0])

    def prepare_forward(self, model_config: _ModelConfig, num_tokens: int) -> None:
        self.inner.prepare_forward(model_config, num_tokens)

    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        if is_profile:
            self.inner.step(is_dummy=is_dummy, is_profile=True, log_stats=log_stats)
            return
        record = self.inner.should_record_tensor
        states = list(self.inner.model_states.values())
        if record is not None and not bool(record):
            # vLLM's router would not have recorded this step's load.
            for state in states:
                state.expert_load_pass.zero_()
        before = [s.physical_to_logical_map.to("cpu").clone() for s in states]
        self.inner.step(is_dummy=is_dummy, is_profile=False, log_stats=log_stats)
        if self.inner.expert_rearrangement_step != 0:
            return
        from vllm.distributed.parallel_state import get_ep_group

        ep = get_ep_group()
        self.counters.rebalances += 1
        for state, old in zip(states, before, strict=True):
            new = state.physical_to_logical_map.to("cpu")
            self.counters.layers_committed += int((old != new).any(dim=1).sum())
            received = experts_received(old, new, ep.world_size)[ep.rank_in_group]
            self.counters.bytes_moved += int(received) * self._bytes_per_expert

    def shutdown(self) -> None:
        """vLLM's sync EplbState holds no thread or buffer to release."""


def build(config: Any, rank: int, device: torch.device) -> Any:
    """The toy model and vLLM's EplbState, in the model runner's order."""
    preset = config.model
    model = _toy_class()(
        num_layers=preset.num_moe_layers,
        num_logical_experts=preset.num_routed_experts,
        num_redundant_experts=config.redundant,
        num_ranks=config.ranks,
        rank=rank,
        hidden_size=preset.toy_hidden_size(config.scale),
        top_k=preset.top_k,
        dtype=preset.toy_dtype,
        device=device,
        seed=config.seed,
    )
    model.num_expert_groups = preset.num_expert_groups
    _attach_layer_states(model)
    model_config = _ModelConfig(f"toy-{preset.name}")
    eplb = VllmBaseline(_enable_eplb(_parallel_config(config), config), device)
    eplb.add_model(model, model_config)
    eplb.step(is_dummy=True, is_profile=True)  # vLLM's profile run
    return model, eplb, model_config
