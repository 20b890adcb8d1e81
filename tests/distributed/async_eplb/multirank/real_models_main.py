"""torchrun script: EplbState on vLLM's real MoE model classes, CPU, gloo.

Per model spec and per implementation (``ours``: our EplbState, async;
``vllm``: vLLM's own EplbState, sync, the reference; ``broken``: ours with
the weight mover disabled, which must be caught), on every rank:

1. build the model (and DeepSeek's MTP drafter) with vLLM's own loader and
   feed distinct per-expert weights through the model's ``load_weights``;
2. drive the EplbState exactly as ``GPUModelRunner`` does: constructor,
   ``add_model`` (drafter first, then target), the profile step,
   ``start_async_loop``, then per engine step ``prepare_forward`` and
   ``step``; between them the router stand-in writes skewed, drifting load
   into each MoE layer's ``expert_load_view`` (dummy steps and padded
   tokens included);
3. after every step, check that every slot the layers' maps route to holds
   its logical expert's original tensors on whichever rank owns it, and that
   all ranks hold the same maps.

Rank 0 prints one ``RESULT {json}`` line per run; the pytest file asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_vllm_models import (
    MODEL_SPECS,
    BuiltModels,
    ModelSpec,
    balancedness_of,
    build_models,
    check_routed_slots,
    inconsistent_maps,
    load_distinct_experts,
    make_vllm_config,
    route_and_record,
    skewed_topk,
    slot_digests,
)

PADDED_TOKENS = 48
UNPADDED_TOKENS = 40
PHASE_STEPS = 16
"""Steps between two changes of the hot experts (the load drifts)."""
DUMMY_EVERY = 11
"""Every this many steps is a dummy step (its load must not count)."""
IMPLS = ("ours", "vllm", "broken")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--runs",
        default=",".join(f"{m}:{i}" for m in MODEL_SPECS for i in ("ours", "vllm")),
        help="model:impl pairs, impl one of ours, vllm, broken",
    )
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--final-steps", type=int, default=48)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def redundant_for(num_experts: int, world: int) -> int:
    """Fewest redundant slots (at least 2) that divide evenly over ranks."""
    extra = 2
    while (num_experts + extra) % world:
        extra += 1
    return extra


def init_parallel(vllm_config: Any, rank: int, world: int) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (
        ensure_model_parallel_initialized,
        get_ep_group,
        init_distributed_environment,
    )
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop

    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world, rank, "env://", int(os.environ["LOCAL_RANK"]), backend="gloo"
        )
        ensure_model_parallel_initialized(world, 1)
    # vLLM's CPU runner does this before loading; the loader's cache
    # emptying fails on CPU without it.
    _set_torch_accelerator_to_noop()
    ep = get_ep_group()
    assert (ep.world_size, ep.rank_in_group) == (world, rank), (ep.world_size, rank)


def eplb_config(args: argparse.Namespace, spec: ModelSpec, world: int, impl: str):
    """The same EPLB knobs for every implementation; only the mode differs.

    vLLM's reference runs in sync mode (its async worker asserts a device
    index, so it cannot run on CPU). Its ``torch_gloo`` communicator calls
    ``torch.accelerator.current_stream()``, which fails on a machine with no
    accelerator; ``torch_nccl`` on CPU tensors sends over the EPLB group's
    gloo CPU group, so the reference uses that. Ours ignores the field.
    """
    from vllm.config import EPLBConfig

    return EPLBConfig(
        window_size=args.window,
        step_interval=args.interval,
        num_redundant_experts=redundant_for(spec.num_experts, world),
        log_balancedness=True,
        log_balancedness_interval=5,
        use_async=impl != "vllm",
        communicator="torch_nccl" if impl == "vllm" else "torch_gloo",
    )


def new_state(impl: str, parallel_config: Any) -> Any:
    """The EplbState under test, built as ``GPUModelRunner`` builds it."""
    if impl == "vllm":
        from vllm.distributed.eplb import eplb_state as vllm_module

        cls = vllm_module.EplbState
        # Our vLLM plugin may have replaced the name: take vLLM's class.
        cls = getattr(cls, "vllm_eplb_state", None) or cls
        assert cls.__module__ == vllm_module.__name__, cls
    else:
        from vllm.distributed.async_eplb.eplb_state import EplbState as cls
    return cls(parallel_config, torch.device("cpu"))


class WallClockEvent:
    """``torch.Event`` stand-in for vLLM's reference run on CPU (timing only).

    vLLM's synchronous ``rearrange`` times itself on EP rank 0 with
    ``torch.Event(enable_timing=True)``, which the CPU backend refuses
    ("cpu backend doesn't support events"). Only that log line uses it.
    """

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.time = 0.0

    def record(self, stream: Any = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def elapsed_time(self, end: WallClockEvent) -> float:
        return 1000.0 * (end.time - self.time)


def cpu_events_missing() -> bool:
    try:
        torch.Event(enable_timing=True).record()
    except RuntimeError:
        return True
    return False


class DisabledMover:
    """Turns our weight mover off: maps commit, no expert row is copied.

    Replaces ``copy_slot_runs`` (buffer -> workspace) in every module of
    the package that imported it, and the async commit's ``copy_rows``, and
    counts the calls it swallowed, so the test knows the patch took effect.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._patched: list[tuple[Any, str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1

    def install(self) -> None:
        for name, module in list(sys.modules.items()):
            if not name.startswith("vllm.distributed.async_eplb"):
                continue
            for attr in ("copy_slot_runs", "copy_rows"):
                if hasattr(module, attr):
                    self._patched.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, self)
        assert self._patched, "no module of async_eplb has copy_slot_runs"

    def uninstall(self) -> None:
        for module, attr, original in self._patched:
            setattr(module, attr, original)
        self._patched = []


# -- what every rank holds, joined ---------------------------------------------
def expert_tensors(model: Any) -> list[list[torch.Tensor]]:
    """Every MoE layer's ``get_expert_weights()`` (scales and biases too)."""
    return [list(layer.get_expert_weights()) for layer in model.moe_layers]


def layer_maps(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``log2phy [L, E, K]`` and ``logcnt [L, E]`` as the routers read them."""
    states = [layer.eplb_state for layer in model.moe_layers]
    log2phy = torch.stack([s.logical_to_physical_map for s in states]).cpu()
    logcnt = torch.stack([s.logical_replica_count for s in states]).cpu()
    width = max(1, int(logcnt.max()))
    return log2phy[..., :width].clone(), logcnt.clone()


def global_digests(model: Any) -> list:
    """``[layer][global physical slot]`` digests, joined over the EP ranks."""
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, slot_digests(expert_tensors(model)))
    return [
        [slot for rank in per_rank for slot in rank[layer]]
        for layer in range(len(per_rank[0]))
    ]


def fill_unloaded_redundant(model: Any, num_experts: int) -> int:
    """Copy each logical expert into redundant slots its loader left unloaded.

    vLLM's ``DeepSeekMTP.load_weights`` builds its expert mapping without
    ``num_redundant_experts``, so redundant slots keep dummy values. Returns
    how many slots were filled (0 for a loader that fills them).
    """
    digests = global_digests(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    filled = 0
    for row, tensors in zip(digests, expert_tensors(model), strict=True):
        stale = [
            p for p in range(num_experts, len(row)) if row[p] != row[p % num_experts]
        ]
        if not stale:
            continue
        local = tensors[0].shape[0]
        for tensor in tensors:
            full = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(full, tensor.contiguous())
            joined = torch.cat(full)
            for slot in stale:
                if slot // local == rank:
                    tensor[slot % local].copy_(joined[slot % num_experts])
        filled += len(stale)
    return filled


class ModelUnderTest:
    """One registered model: expected digests, load totals, round counts."""

    def __init__(
        self,
        index: int,
        model: Any,
        config: Any,
        name: str,
        spec: ModelSpec,
        fed: dict,
    ) -> None:
        fed = fed[id(model)]
        self.index = index
        self.model = model
        self.config = config
        self.name = name
        self.spec = spec
        self.unloaded = fill_unloaded_redundant(model, spec.num_experts)
        digests = global_digests(model)
        # Slot e holds logical expert e in vLLM's initial placement.
        self.expected = [row[: spec.num_experts] for row in digests]
        self.problems: list[str] = []
        for layer, row in enumerate(self.expected):
            if len(set(row)) != len(row):
                self.problems.append(f"layer {layer}: experts not distinct")
            for expert, tensors in enumerate(row):
                if fed.get((layer, expert)) not in tensors:
                    self.problems.append(
                        f"layer {layer} expert {expert}: load_weights did not "
                        "write the fed down projection"
                    )
        self.final_load = torch.zeros(
            model.num_moe_layers, spec.num_experts, dtype=torch.int64
        )
        self.last_phy2log: torch.Tensor | None = None
        self.rounds = 0

    def hot(self, step: int, layer: int, final_from: int, seed: int) -> list[int]:
        """Hot experts of a (step, layer): a new permutation every phase."""
        phase = min(step, final_from) // PHASE_STEPS
        gen = torch.Generator().manual_seed(
            seed * 7919 + phase * 131 + layer * 17 + self.index
        )
        return torch.randperm(self.spec.num_experts, generator=gen)[:4].tolist()


def forward(
    state: Any,
    mut: ModelUnderTest,
    step: int,
    dummy: bool,
    args: argparse.Namespace,
) -> None:
    """One forward pass of ``mut``: prepare_forward, then every MoE router."""
    rank = dist.get_rank()
    if not dummy:
        state.prepare_forward(mut.config, UNPADDED_TOKENS)
    final_from = args.steps - args.final_steps
    for layer_index, layer in enumerate(mut.model.moe_layers):
        gen = torch.Generator().manual_seed(
            ((args.seed * 1009 + step) * 64 + rank) * 64 + layer_index * 4 + mut.index
        )
        spec = mut.spec
        if dummy:
            shape = (PADDED_TOKENS, spec.top_k)
            ids = torch.randint(0, spec.num_experts, shape, generator=gen)
        else:
            ids = skewed_topk(
                PADDED_TOKENS,
                spec.num_experts,
                spec.top_k,
                hot=mut.hot(step, layer_index, final_from, args.seed),
                generator=gen,
                num_groups=spec.num_groups,
                topk_groups=spec.topk_groups,
            )
            # Padding tokens all pick experts 0..top_k-1: they must not count.
            ids[UNPADDED_TOKENS:] = torch.arange(spec.top_k)
            if step >= final_from:
                mut.final_load[layer_index] += torch.bincount(
                    ids[:UNPADDED_TOKENS].reshape(-1), minlength=spec.num_experts
                )
        route_and_record(ids, layer.eplb_state)


def phy2log_of(state: Any, model: Any) -> torch.Tensor:
    for model_state in state.model_states.values():
        if model_state.model is model:
            return model_state.physical_to_logical_map.cpu().clone()
    raise AssertionError(f"{type(model).__name__} is not registered")


def check_step(state: Any, mut: ModelUnderTest) -> tuple[int, bool]:
    """(routed slots with wrong weights, all ranks hold the same, consistent
    maps)."""
    log2phy, logcnt = layer_maps(mut.model)
    phy2log = phy2log_of(state, mut.model)
    maps: list = [None] * dist.get_world_size()
    dist.all_gather_object(maps, (log2phy.tolist(), logcnt.tolist(), phy2log.tolist()))
    same = all(m == maps[0] for m in maps)
    consistent = not inconsistent_maps(phy2log, log2phy, logcnt)
    bad = check_routed_slots(mut.expected, global_digests(mut.model), log2phy, logcnt)
    return len(bad), same and consistent


class Tally:
    """Wrong routed slots and map disagreements, over every checked step."""

    def __init__(self) -> None:
        self.worst = 0
        self.total = 0
        self.maps_agree = True

    def check(self, state: Any, mut: ModelUnderTest) -> None:
        bad, same = check_step(state, mut)
        self.worst = max(self.worst, bad)
        self.total += bad
        self.maps_agree = self.maps_agree and same


def drive(
    state: Any, order: list[ModelUnderTest], args: argparse.Namespace, log: bool
) -> tuple[Tally, list[float]]:
    """The model runner's step loop; every slot checked after every step.

    A round of ours commits layer by layer over several steps: it is counted
    for a model once our counters say it finished and the model's placement
    changed. vLLM's sync mode moves every layer within one ``step()``.
    """
    tally = Tally()
    for mut in order:
        tally.check(state, mut)  # the profile step must not touch weights
        mut.last_phy2log = phy2log_of(state, mut.model)
    counters = getattr(state, "counters", None)
    seen = counters.rebalances if counters is not None else 0
    step_times = []
    for step in range(args.steps):
        dummy = step % DUMMY_EVERY == DUMMY_EVERY - 1
        for mut in order:
            forward(state, mut, step, dummy, args)
        start = time.perf_counter()
        state.step(is_dummy=dummy, is_profile=False, log_stats=log)
        step_times.append(time.perf_counter() - start)
        round_done = counters is None or counters.rebalances > seen
        for mut in order:
            tally.check(state, mut)
            now = phy2log_of(state, mut.model)
            if round_done and not torch.equal(now, mut.last_phy2log):
                mut.rounds += 1
                mut.last_phy2log = now
        if counters is not None:
            seen = counters.rebalances
    return tally, step_times


def summarize(
    state: Any, order: list[ModelUnderTest], spec: ModelSpec, tally: Tally
) -> dict:
    """What the pytest file asserts on (rank 0 prints it)."""
    world = dist.get_world_size()
    for mut in order:
        dist.all_reduce(mut.final_load)

    def initial(mut: ModelUnderTest) -> torch.Tensor:
        row = state.build_initial_global_physical_to_logical_map(
            spec.num_experts, mut.model.num_redundant_experts
        )
        return torch.tensor(row).expand(mut.model.num_moe_layers, -1)

    result = {
        "model": spec.name,
        "world": world,
        "classes": [type(m.model).__name__ for m in order],
        "names": [m.name for m in order],
        "worst_step_mismatches": tally.worst,
        "total_mismatches": tally.total,
        "maps_agree": tally.maps_agree,
        "rounds": [m.rounds for m in order],
        "balancedness": [
            balancedness_of(phy2log_of(state, m.model), m.final_load, world)
            for m in order
        ],
        "initial_balancedness": [
            balancedness_of(initial(m), m.final_load, world) for m in order
        ],
        "unloaded_redundant_slots": [m.unloaded for m in order],
        "setup_problems": [p for m in order for p in m.problems],
    }
    counters = getattr(state, "counters", None)
    if counters is not None:
        result["counters"] = {
            name: getattr(counters, name)
            for name in (
                "rebalances",
                "skips",
                "aborts",
                "layers_committed",
                "worker_deaths",
                "balancing_enabled",
            )
        }
    return result


def run_one(
    args: argparse.Namespace, spec: ModelSpec, impl: str, workdir: Path
) -> dict:
    """Build ``spec``, register it with ``impl``'s EplbState, drive, check."""
    from vllm.config import set_current_vllm_config

    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    vllm_config = make_vllm_config(
        spec,
        workdir / f"{spec.name}-{impl}-r{rank}",
        world,
        eplb_config(args, spec, world, impl),
    )
    built: BuiltModels = build_models(vllm_config)
    fed = load_distinct_experts(built, spec, seed=args.seed)
    build_s = time.perf_counter() - start
    mover = DisabledMover() if impl == "broken" else None
    real_event = torch.Event
    if impl == "vllm" and cpu_events_missing():
        torch.Event = WallClockEvent  # type: ignore[misc]
    try:
        with set_current_vllm_config(vllm_config):
            # Expected digests are taken before add_model: the original weights.
            muts = [
                ModelUnderTest(i, model, config, name or config.model, spec, fed)
                for i, (model, config, name) in enumerate(built.registered())
            ]
            state = new_state(impl, vllm_config.parallel_config)
            for model, config, name in built.registered():
                state.add_model(model, config, model_name=name)
            if mover is not None:
                mover.install()
            state.step(is_dummy=True, is_profile=True)
            state.start_async_loop()
            # The runner's forward order: the target, then the drafter.
            order = sorted(muts, key=lambda m: m.model is not built.model)
            log = bool(vllm_config.parallel_config.eplb_config.log_balancedness)
            tally, step_times = drive(state, order, args, log)
            result = {"impl": impl, **summarize(state, order, spec, tally)}
            result["build_s"] = round(build_s, 2)
            result["run_s"] = round(time.perf_counter() - start - build_s, 2)
            result["max_step_ms"] = round(1000 * max(step_times), 2)
            if mover is not None:
                result["disabled_mover_calls"] = mover.calls
            shutdown = getattr(state, "shutdown", None)  # ours only
            if shutdown is not None:
                shutdown()
    finally:
        if mover is not None:
            mover.uninstall()
        torch.Event = real_event  # type: ignore[misc]
    dist.barrier()
    return result


def main() -> None:
    args = parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs = [tuple(pair.split(":")) for pair in args.runs.split(",") if pair]
    for pair in runs:
        if len(pair) != 2 or pair[0] not in MODEL_SPECS or pair[1] not in IMPLS:
            raise SystemExit(
                f"--runs: bad entry {':'.join(pair)!r} (models {list(MODEL_SPECS)}, "
                f"implementations {IMPLS})"
            )
    with tempfile.TemporaryDirectory(prefix="real-models-") as tmp:
        workdir = Path(tmp)
        first = MODEL_SPECS[runs[0][0]]
        init_parallel(
            make_vllm_config(
                first,
                workdir / f"init-r{rank}",
                world,
                eplb_config(args, first, world, "vllm"),
            ),
            rank,
            world,
        )
        for name, impl in runs:
            try:
                result = run_one(args, MODEL_SPECS[name], impl, workdir)
            except Exception:
                # Ranks may now be out of step in their collectives: report
                # and stop, the later runs cannot be trusted.
                error = {"model": name, "impl": impl, "error": traceback.format_exc()}
                print(f"RESULT {json.dumps(error)}")
                sys.stdout.flush()
                os._exit(1)
            if rank == 0:
                print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    print(f"REAL MODELS DONE rank {rank}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
