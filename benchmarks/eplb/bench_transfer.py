"""Transfer benchmark: bytes per second of each transport, against the floor.

A DeepSeek-V3-shaped MoE layer (FP8 ``w13 [2I, H]`` and ``w2 [H, I]`` as
uint8, plus block scales), scaled by ``--scale`` to fit, 9 experts per rank.
Old and new placements are independent random packings, so nearly every slot
changes (as vLLM's default policy does after a small load drift).

Per run, on the same ranks and inputs:
- floor: device-to-device copy rate of one rank-layer of bytes;
- each transport: staging every layer (``stage_layer``) then committing it;
- ours end to end: the StagingWorker with a commit loop (all-reduce of staged
  flags every 5 ms as the agreement stand-in), whole model, and how long the
  main thread was blocked in ``submit`` + ``commit_layer`` (the engine's stall);
- vLLM (CPU only, needs vLLM): ``rearrange_expert_weights_inplace`` with its
  gloo communicator (a no-op accelerator stream is patched in on CPU).
Besides wall time, the CPU time of every method (all ranks and threads, gloo's
included): with more ranks than cores, wall time follows CPU work.
Every result is checked bit-exact against the expected experts.

    python benchmarks/eplb/bench_transfer.py --num-ranks 4 --json out.json
    python benchmarks/eplb/bench_transfer.py --device cuda --num-ranks 2

Relaunches itself under torchrun when not started by it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from torchrun_launch import relaunch_under_torchrun  # noqa: E402

from vllm.distributed.async_eplb.device import DeviceBackend  # noqa: E402
from vllm.distributed.async_eplb.maps import ExpertMaps  # noqa: E402
from vllm.distributed.async_eplb.planner import plan_layers  # noqa: E402
from vllm.distributed.async_eplb.staging import (  # noqa: E402
    StagingBuffer,
    copy_slot_runs,
    slot_runs,
)
from vllm.distributed.async_eplb.transports import make_transport  # noqa: E402
from vllm.distributed.async_eplb.worker import StagingWorker  # noqa: E402

SLOTS_PER_RANK = 9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--num-ranks", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=0, help="0: all on one")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scale", type=int, default=8, help="divide H=7168, I=2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ring", type=int, default=2, help="staging ring slots")
    p.add_argument("--transports", default="")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--json", default="")
    return p.parse_args()


# ---- model -------------------------------------------------------------


def expert_shapes(scale: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    hidden, inter = 7168 // scale, 2048 // scale
    return [
        ((2 * inter, hidden), torch.uint8),  # w13, FP8 as bytes
        ((hidden, inter), torch.uint8),  # w2
        ((max(1, 2 * inter // 128), max(1, hidden // 128)), torch.float32),
        ((max(1, hidden // 128), max(1, inter // 128)), torch.float32),
    ]


def expert_tensor(layer: int, expert: int, shape, dtype, device) -> torch.Tensor:
    """Cheap deterministic content, distinct per (layer, expert, tensor)."""
    n = 1
    for d in shape:
        n *= d
    base = torch.arange(n, dtype=torch.int64, device=device)
    vals = (base * 7 + layer * 131 + expert * 29) % 251
    return vals.to(dtype).view(shape)


def build_weights(rows, rank: int, shapes, device) -> list[list[torch.Tensor]]:
    out = []
    for layer, row in enumerate(rows):
        slots = row[rank * SLOTS_PER_RANK : (rank + 1) * SLOTS_PER_RANK]
        out.append(
            [
                torch.stack([expert_tensor(layer, e, s, d, device) for e in slots])
                for s, d in shapes
            ]
        )
    return out


def check(weights, rows, rank: int, shapes, device, what: str) -> None:
    expected = build_weights(rows, rank, shapes, device)
    for layer, (got, want) in enumerate(zip(weights, expected, strict=True)):
        for g, w in zip(got, want, strict=True):
            if not torch.equal(g, w):
                raise AssertionError(f"{what}: rank {rank} layer {layer} differs")


def placement(rng: random.Random, experts: int, slots: int) -> list[int]:
    row = list(range(experts)) + [
        rng.randrange(experts) for _ in range(slots - experts)
    ]
    rng.shuffle(row)
    return row


# ---- measurements ------------------------------------------------------


def max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def sum_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def cpu_over_ranks(cpu_start: float) -> float:
    """CPU seconds (all threads: ours and gloo's) since ``cpu_start``, all ranks."""
    t = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def measure_floor(backend, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=backend.device)
    dst = torch.empty_like(src)
    src.fill_(3)
    best = float("inf")
    for _ in range(repeats + 1):
        backend.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure_transport(ctx, name: str) -> dict:
    """Stage then commit every layer directly (no worker thread)."""
    backend, rank = ctx["backend"], ctx["rank"]
    times, cpu, received = [], [], 0
    for _ in range(ctx["repeats"]):
        weights = build_weights(ctx["old"], rank, ctx["shapes"], backend.device)
        transport = make_transport(
            name,
            backend=backend,
            group=ctx["groups"][name],
            expert_weights=weights,
            ranks_per_node=ctx["rpn"],
        )
        buffer = StagingBuffer(weights[0], backend)
        dist.barrier()
        backend.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        received = 0
        for layer, plan in enumerate(ctx["plans"]):
            received += transport.stage_layer(
                plan, rank, weights[layer], buffer.slot(0), packed=buffer.packed(0)
            )
            backend.synchronize()
            if name == "ipc":  # peers read our weights: commit after they did
                dist.barrier(group=ctx["groups"]["cpu"])
            changed = plan.ranks[rank].changed_slots
            copy_slot_runs(weights[layer], buffer.slot(0), slot_runs(changed, changed))
        backend.synchronize()
        times.append(max_over_ranks(time.perf_counter() - start))
        cpu.append(cpu_over_ranks(cpu_start))
        check(weights, ctx["new"], rank, ctx["shapes"], backend.device, name)
    seconds = min(times)
    total = sum_over_ranks(received)
    return {
        "seconds": seconds,
        "cpu_s_all_ranks": min(cpu),
        "bytes_received_all_ranks": total,
        "bytes_per_s_per_rank": total / ctx["nproc"] / seconds,
    }


def measure_gloo_floor(ctx) -> dict:
    """The plan's bytes as one preallocated host message per peer and layer.

    No packing, no unpacking, no local copies: what gloo itself costs for the
    bytes any transport over it must move on these inputs.
    """
    rank, group = ctx["rank"], ctx["groups"]["gloo-staged"]
    row_bytes = ctx["row_bytes"]
    messages = []
    for plan in ctx["plans"]:
        ops = []
        for peer_of, transfers, op in (
            (lambda t: t.dst_rank, plan.ranks[rank].sends, dist.isend),
            (lambda t: t.src_rank, plan.ranks[rank].receives, dist.irecv),
        ):
            counts: dict[int, int] = {}
            for t in transfers:
                counts[peer_of(t)] = counts.get(peer_of(t), 0) + 1
            for peer, n in sorted(counts.items()):
                # Written, so that no page is the shared zero page.
                buf = torch.full((n * row_bytes,), 7, dtype=torch.uint8)
                ops.append((op, buf, peer))
        messages.append(ops)
    times, cpu = [], []
    for _ in range(ctx["repeats"]):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        for ops in messages:
            if ops:
                works = dist.batch_isend_irecv(
                    [dist.P2POp(op, buf, peer, group) for op, buf, peer in ops]
                )
                for work in works:
                    work.wait()
        times.append(max_over_ranks(time.perf_counter() - start))
        cpu.append(cpu_over_ranks(cpu_start))
    return {"seconds": min(times), "cpu_s_all_ranks": min(cpu)}


def measure_worker(ctx, name: str) -> dict:
    """Whole model through StagingWorker, committing as layers get staged."""
    backend, rank = ctx["backend"], ctx["rank"]
    num_layers = len(ctx["plans"])
    times, stalls = [], []
    for _ in range(ctx["repeats"]):
        weights = build_weights(ctx["old"], rank, ctx["shapes"], backend.device)
        maps = ExpertMaps(torch.tensor(ctx["old"]), ctx["experts"], ctx["slots"])
        transport = make_transport(
            name,
            backend=backend,
            group=ctx["groups"][name],
            expert_weights=weights,
            ranks_per_node=ctx["rpn"],
        )
        buffer = StagingBuffer(weights[0], backend, ring_size=ctx["ring"])
        worker = StagingWorker(weights, buffer, transport, backend, rank=rank)
        worker.start()
        dist.barrier()
        start = time.perf_counter()
        worker.submit(0, dict(enumerate(ctx["plans"])))
        blocked = time.perf_counter() - start
        committed = 0
        while committed < num_layers:
            flags = torch.zeros(num_layers, dtype=torch.int32)
            for layer in worker.staged_layers():
                flags[layer] = 1
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=ctx["groups"]["cpu"])
            while committed < num_layers and flags[committed]:
                new_row = torch.tensor(ctx["new"][committed])
                commit_start = time.perf_counter()
                worker.commit_layer(committed, maps, new_row)
                blocked += time.perf_counter() - commit_start
                committed += 1
            if worker.error is not None:
                raise worker.error
            time.sleep(0.005)  # one agreement poll per "engine step"
        backend.synchronize()
        times.append(max_over_ranks(time.perf_counter() - start))
        stalls.append(max_over_ranks(blocked))
        worker.stop()
        check(weights, ctx["new"], rank, ctx["shapes"], backend.device, "worker")
    return {"seconds": min(times), "main_thread_blocked_s": min(stalls)}


def measure_vllm(ctx) -> dict:
    """vLLM's synchronous rearrangement with its gloo communicator."""
    from vllm.distributed.eplb.eplb_communicator import (
        TorchDistGlooStagedEplbCommunicator,
    )
    from vllm.distributed.eplb.rebalance_execute import (
        rearrange_expert_weights_inplace,
    )

    class _NoOpStream:
        def synchronize(self) -> None:
            return None

    if ctx["backend"].is_synchronous:
        torch.accelerator.current_stream = lambda *a, **k: _NoOpStream()
    backend, rank = ctx["backend"], ctx["rank"]
    times, cpu = [], []
    for _ in range(ctx["repeats"]):
        weights = build_weights(ctx["old"], rank, ctx["shapes"], backend.device)
        buffer = [torch.empty_like(w) for w in weights[0]]
        comm = TorchDistGlooStagedEplbCommunicator(cpu_group=ctx["groups"]["cpu"])
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        rearrange_expert_weights_inplace(
            torch.tensor(ctx["old"]),
            torch.tensor(ctx["new"]),
            weights,
            buffer,
            ep_group=dist.group.WORLD,
            communicator=comm,
        )
        backend.synchronize()
        times.append(max_over_ranks(time.perf_counter() - start))
        cpu.append(cpu_over_ranks(cpu_start))
        check(weights, ctx["new"], rank, ctx["shapes"], backend.device, "vllm")
    return {"seconds": min(times), "cpu_s_all_ranks": min(cpu)}


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        return relaunch_under_torchrun(__file__, args.num_ranks)
    dist.init_process_group("gloo")
    rank, nproc = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.accelerator.device_count())
        torch.accelerator.set_device_index(device.index)
    else:
        device = torch.device("cpu")
    backend = DeviceBackend.for_device(device)
    rpn = args.ranks_per_node or nproc
    slots = nproc * SLOTS_PER_RANK
    experts = nproc * (SLOTS_PER_RANK - 1)  # one redundant slot per rank
    rng = random.Random(0)
    old = [placement(rng, experts, slots) for _ in range(args.layers)]
    new = [placement(rng, experts, slots) for _ in range(args.layers)]
    shapes = expert_shapes(args.scale)
    gloo = dist.new_group(backend="gloo")
    groups = {"cpu": dist.group.WORLD, "gloo-staged": gloo}
    names = ["gloo-staged"]
    if device.type == "cuda":
        groups["ipc"] = gloo
        names.append("ipc")
        if torch.accelerator.device_count() >= nproc:
            groups["p2p"] = dist.new_group(backend="nccl")
            names.append("p2p")
    else:
        groups["p2p"] = gloo
        names.append("p2p")
    if args.transports:
        names = [n for n in args.transports.split(",") if n in groups]
    ctx = {
        "backend": backend,
        "rank": rank,
        "nproc": nproc,
        "rpn": rpn,
        "old": old,
        "new": new,
        "shapes": shapes,
        "plans": plan_layers(torch.tensor(old), torch.tensor(new), nproc, rpn),
        "groups": groups,
        "repeats": args.repeats,
        "experts": experts,
        "slots": slots,
        "ring": args.ring,
    }
    row_bytes = sum(
        torch.empty(s, dtype=d).numel() * torch.empty((), dtype=d).element_size()
        for s, d in shapes
    )
    layer_bytes = row_bytes * SLOTS_PER_RANK
    ctx["row_bytes"] = row_bytes
    results: dict = {
        "device": str(device),
        "nproc": nproc,
        "ranks_per_node": rpn,
        "layers": args.layers,
        "scale": args.scale,
        "expert_bytes": row_bytes,
        "rank_layer_bytes": layer_bytes,
        "changed_slot_fraction": sum(
            len(p.ranks[r].changed_slots) for p in ctx["plans"] for r in range(nproc)
        )
        / (args.layers * slots),
        "floor_d2d_bytes_per_s": measure_floor(backend, layer_bytes, args.repeats),
        "transports": {},
    }
    # Round-robin over the methods, one run each per round, so that load from
    # other processes hits them alike; medians are reported.
    ctx["repeats"] = 1
    with_vllm = (
        device.type == "cpu"
        and not args.skip_vllm
        and importlib.util.find_spec("vllm.distributed.eplb") is not None
    )
    runs: dict[str, list[float]] = {}
    received: dict[str, int] = {}
    for _ in range(args.repeats):
        for name in names:
            staged = measure_transport(ctx, name)
            received[name] = staged["bytes_received_all_ranks"]
            runs.setdefault(f"{name}:stage_commit", []).append(staged["seconds"])
            runs.setdefault(f"{name}:cpu", []).append(staged["cpu_s_all_ranks"])
            worker = measure_worker(ctx, name)
            runs.setdefault(f"{name}:worker", []).append(worker["seconds"])
            runs.setdefault(f"{name}:blocked", []).append(
                worker["main_thread_blocked_s"]
            )
        if device.type == "cpu":
            floor = measure_gloo_floor(ctx)
            runs.setdefault("gloo_floor", []).append(floor["seconds"])
            runs.setdefault("gloo_floor:cpu", []).append(floor["cpu_s_all_ranks"])
        if with_vllm:
            vllm = measure_vllm(ctx)
            runs.setdefault("vllm", []).append(vllm["seconds"])
            runs.setdefault("vllm:cpu", []).append(vllm["cpu_s_all_ranks"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    results["runs_s"] = runs
    for name in names:
        seconds = med[f"{name}:stage_commit"]
        results["transports"][name] = {
            "seconds": seconds,
            "bytes_received_all_ranks": received[name],
            "bytes_per_s_per_rank": received[name] / nproc / seconds,
            "worker_whole_model_s": med[f"{name}:worker"],
            "worker_main_thread_blocked_s": med[f"{name}:blocked"],
            "cpu_s_all_ranks": med[f"{name}:cpu"],
        }
    results["cpu_cores"] = os.cpu_count()
    if "gloo_floor" in med:
        results["gloo_floor_s"] = med["gloo_floor"]
        results["gloo_floor_cpu_s_all_ranks"] = med["gloo_floor:cpu"]
    if "vllm" in med:
        results["vllm_rearrange_s"] = med["vllm"]
        results["vllm_cpu_s_all_ranks"] = med["vllm:cpu"]
    if rank == 0:
        report(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def report(r: dict) -> None:
    floor = r["floor_d2d_bytes_per_s"]
    print(
        f"{r['device']} x{r['nproc']} ranks, {r['layers']} layers, "
        f"expert {r['expert_bytes'] / 1e6:.2f} MB, rank-layer "
        f"{r['rank_layer_bytes'] / 1e6:.1f} MB, "
        f"{100 * r['changed_slot_fraction']:.0f}% slots changed"
    )
    print(f"floor (device copy): {floor / 1e9:.2f} GB/s")
    vllm_s = r.get("vllm_rearrange_s")
    for name, t in r["transports"].items():
        rate = t["bytes_per_s_per_rank"]
        line = (
            f"{name:12s} stage+commit {t['seconds'] * 1e3:8.1f} ms  "
            f"{rate / 1e9:6.3f} GB/s/rank ({100 * rate / floor:5.1f}% of floor)  "
            f"worker whole model {t['worker_whole_model_s'] * 1e3:8.1f} ms "
            f"(main thread blocked {t['worker_main_thread_blocked_s'] * 1e3:.1f} ms)"
        )
        if vllm_s:
            line += (
                f"  vLLM/ours: stage+commit {vllm_s / t['seconds']:.2f}x, "
                f"worker {vllm_s / t['worker_whole_model_s']:.2f}x"
            )
        print(line + f"  CPU {t['cpu_s_all_ranks'] * 1e3:.1f} ms (all ranks)")
    if vllm_s:
        print(
            f"vLLM rearrange_expert_weights_inplace: {vllm_s * 1e3:.1f} ms  "
            f"CPU {r['vllm_cpu_s_all_ranks'] * 1e3:.1f} ms (all ranks)"
        )
    if "gloo_floor_s" in r:
        print(
            f"gloo floor (plan's bytes, one message per peer, no copies): "
            f"{r['gloo_floor_s'] * 1e3:.1f} ms  "
            f"CPU {r['gloo_floor_cpu_s_all_ranks'] * 1e3:.1f} ms (all ranks)"
        )
    print(
        f"CPU time is summed over ranks and threads (gloo's included); "
        f"{r['cpu_cores']} cores: a method whose CPU / cores is close to its "
        "wall time is bound by CPU work, not by waiting"
    )


if __name__ == "__main__":
    sys.exit(main())
