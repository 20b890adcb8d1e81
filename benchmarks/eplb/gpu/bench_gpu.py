"""One-GPU measurements of async_eplb's data path (issue 7), with torch alone.

Runs on one CUDA GPU (the lent H200): no vLLM needed. Measures, in one run:

1. floor: device-to-device copy of one DeepSeek-V3-shaped layer of one rank
   (9 experts x 44 MB, FP8 stored as uint8: 396 MB);
2. commit: ``StagingWorker.commit_layer`` of that layer against the floor;
3. overlap: a decode-step stand-in (58 MoE layers x 9 experts, batch 64, bf16
   products) with and without the worker staging one layer per step on its
   side stream and the main stream committing it between steps;
4. ipc: two processes sharing the GPU (two EP ranks) swap a layer through the
   ``ipc`` transport: bit-exact check and rate against the floor;
5. CUDA graphs: a toy MoE layer's forward captured in a graph, a new placement
   committed in place, the graph replayed: equal to eager and to the reference.

    python benchmarks/eplb/gpu/bench_gpu.py --json out.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.maps import ExpertMaps
from vllm.distributed.async_eplb.planner import (
    LayerPlan,
    RankPlan,
    Transfer,
    plan_layer,
)
from vllm.distributed.async_eplb.staging import StagingBuffer
from vllm.distributed.async_eplb.transports import make_transport
from vllm.distributed.async_eplb.worker import StagingWorker

EXPERTS_PER_RANK = 9
EXPERT_BYTES = 44_040_192  # 3 x 7168 x 2048 FP8 weights of one DeepSeek-V3 expert
HIDDEN, INTER = 7168, 2048


def event_ms(fn, reps: int, warmup: int = 3) -> list[float]:
    """Device time of ``fn`` on the current stream, per repetition (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = (
            torch.cuda.Event(enable_timing=True),
            torch.cuda.Event(enable_timing=True),
        )
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def init_single_rank_group() -> None:
    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="eplb-gpu-store-"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def measure_floor(reps: int) -> dict:
    src = torch.randint(
        0, 255, (EXPERTS_PER_RANK, EXPERT_BYTES), dtype=torch.uint8, device="cuda"
    )
    dst = torch.empty_like(src)
    ms = statistics.median(event_ms(lambda: dst.copy_(src), reps))
    nbytes = src.numel()
    return {
        "layer_bytes": nbytes,
        "copy_ms": ms,
        "copy_GBps_one_way": nbytes / ms / 1e6,
        "copy_TBps_read_plus_write": 2 * nbytes / ms / 1e9,
    }


def permuted_row(num_slots: int, shift: int) -> torch.Tensor:
    return torch.roll(torch.arange(num_slots), shift)


class OneRankStager:
    """A worker over one rank's layers whose jobs permute experts in place."""

    def __init__(self, num_layers: int, backend: DeviceBackend) -> None:
        init_single_rank_group()
        self.weights = [
            [
                torch.randint(
                    0,
                    255,
                    (EXPERTS_PER_RANK, EXPERT_BYTES),
                    dtype=torch.uint8,
                    device="cuda",
                )
            ]
            for _ in range(num_layers)
        ]
        self.maps = ExpertMaps(
            torch.arange(EXPERTS_PER_RANK).repeat(num_layers, 1),
            EXPERTS_PER_RANK,
            1,
            device="cuda",
        )
        self.buffer = StagingBuffer(self.weights[0], backend)
        transport = make_transport(
            "gloo-staged", backend=backend, group=dist.group.WORLD
        )
        self.worker = StagingWorker(
            self.weights, self.buffer, transport, backend, rank=0
        )
        self.worker.start()
        self.job_id = 0

    def submit(self, layers: list[int], shift: int) -> dict[int, torch.Tensor]:
        rows = {}
        plans = {}
        for layer in layers:
            old = self.maps.phy2log[layer].cpu()
            new = old[permuted_row(EXPERTS_PER_RANK, shift)]
            rows[layer] = new
            plans[layer] = plan_layer(old, new, 1, 1)
        self.job_id += 1
        self.worker.submit(self.job_id, plans, maps=self.maps, new_rows=rows)
        return rows

    def wait_staged(self, layer: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while layer not in self.worker.staged_layers():
            if self.worker.error is not None:
                raise self.worker.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"layer {layer} not staged in {timeout}s")
            time.sleep(0.0002)


def measure_commit(reps: int, floor_ms: float, backend: DeviceBackend) -> dict:
    stager = OneRankStager(1, backend)
    results = {}
    variants = (
        ("9 slots in 1 run, maps prepared by the worker", 1, True),
        ("9 slots in 2 runs, maps prepared by the worker", 4, True),
        ("9 slots in 1 run, maps derived on the host at commit", 1, False),
    )
    for name, shift, prepared in variants:
        samples: dict[str, list[float]] = {"idle": [], "busy": [], "host": []}
        for i in range(2 * reps):
            # even repetitions: the stream idle at the call, so host launch
            # time shows; odd: the stream busy (as between two engine steps,
            # when the forward is still queued), so only device work shows
            busy = i % 2 == 1
            rows = stager.submit([0], shift)
            stager.wait_staged(0)
            expected = stager.buffer.slot(0)[0].clone()
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if busy:
                torch.cuda._sleep(2_000_000)  # ~1 ms of queued work
            start.record()
            t0 = time.perf_counter()
            stager.worker.commit_layer(0, stager.maps, None if prepared else rows[0])
            samples["host"].append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            samples["busy" if busy else "idle"].append(start.elapsed_time(end))
            assert torch.equal(stager.weights[0][0], expected), "commit not bit-exact"
            assert stager.maps.phy2log[0].tolist() == rows[0].tolist()
        med = {k: statistics.median(v) for k, v in samples.items()}
        results[name] = {
            "device_ms_stream_busy": med["busy"],
            "device_ms_stream_idle": med["idle"],
            "host_ms": med["host"],
            "vs_floor": med["busy"] / floor_ms,
        }
    stager.worker.stop()
    return results


class DecodeStandIn:
    """58 MoE layers x 9 experts, batch 64, bf16 products (memory bound)."""

    def __init__(self, num_layers: int) -> None:
        self.x = torch.randn(64, HIDDEN, dtype=torch.bfloat16, device="cuda")
        self.w_up = [
            torch.randn(
                EXPERTS_PER_RANK, HIDDEN, 2 * INTER, dtype=torch.bfloat16, device="cuda"
            )
            * 0.01
            for _ in range(num_layers)
        ]
        self.w_down = [
            torch.randn(
                EXPERTS_PER_RANK, INTER, HIDDEN, dtype=torch.bfloat16, device="cuda"
            )
            * 0.01
            for _ in range(num_layers)
        ]

    def capture(self) -> None:
        """Replay the step as one CUDA graph, as vLLM's decode does."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.forward()

    def step(self) -> None:
        self.graph.replay()

    def forward(self) -> torch.Tensor:
        h = self.x
        for up, down in zip(self.w_up, self.w_down, strict=True):
            acc = torch.zeros_like(h)
            for e in range(EXPERTS_PER_RANK):
                g = h @ up[e]
                acc += (g[:, :INTER] * torch.sigmoid(g[:, INTER:])) @ down[e]
            h = acc * 0.1 + h
        return h


def measure_overlap(
    steps: int, num_layers: int, backend: DeviceBackend, staged_layers: int
) -> dict:
    model = DecodeStandIn(num_layers)
    model.capture()
    stager = OneRankStager(staged_layers, backend)

    def timed_steps(with_eplb: bool) -> list[float]:
        times = []
        pending: list[int] = []
        shift = 1
        for i in range(steps + 5):
            if with_eplb and not pending and not stager.worker.busy:
                stager.submit(list(range(staged_layers)), shift)
                pending = list(range(staged_layers))
                shift = 1 + shift % (EXPERTS_PER_RANK - 1)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            model.step()
            if with_eplb and pending and pending[0] in stager.worker.staged_layers():
                # as EplbState does between two steps: commit one staged layer
                layer = pending.pop(0)
                stager.worker.commit_layer(layer, stager.maps)
            end.record()
            end.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        return times

    base = timed_steps(False)
    loaded = timed_steps(True)
    base2 = timed_steps(False)
    stager.worker.stop()
    base_all = base + base2
    b, m = statistics.median(base_all), statistics.median(loaded)
    return {
        "steps": steps,
        "baseline_step_ms": b,
        "with_staging_step_ms": m,
        "slowdown_pct": 100 * (m / b - 1),
        "baseline_spread_pct": 100
        * abs(statistics.median(base) / statistics.median(base2) - 1),
        "layers_staged": int(stager.job_id * staged_layers),
        "worker_stream_priority": 0,
    }


def one_way_plan() -> LayerPlan:
    """Rank 1 pulls all nine experts of rank 0 (built directly, not planned)."""
    pulls = tuple(
        Transfer(expert=e, src_rank=0, src_slot=e, dst_rank=1, dst_slots=(e,))
        for e in range(EXPERTS_PER_RANK)
    )
    keep = tuple(range(EXPERTS_PER_RANK))
    return LayerPlan(
        2,
        EXPERTS_PER_RANK,
        (RankPlan(0, keep, (), (), pulls), RankPlan(1, (), (), pulls, ())),
    )


def _ipc_rank(rank: int, store_path: str, reps: int, queue) -> None:
    torch.cuda.set_device(0)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    backend = DeviceBackend.for_device("cuda:0")
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)
    # rank r holds experts [9r, 9r+9): a layer of experts with distinct contents
    weights = [
        [
            torch.randint(
                0,
                255,
                (EXPERTS_PER_RANK, EXPERT_BYTES),
                dtype=torch.uint8,
                device="cuda",
                generator=gen,
            )
        ]
    ]
    transport = make_transport(
        "ipc",
        backend=backend,
        group=dist.group.WORLD,
        expert_weights=weights,
        ranks_per_node=2,
    )
    buffer = StagingBuffer(weights[0], backend)
    old = torch.arange(2 * EXPERTS_PER_RANK)
    new = torch.cat([old[EXPERTS_PER_RANK:], old[:EXPERTS_PER_RANK]])
    plans = {"one_way": one_way_plan(), "swap": plan_layer(old, new, 2, 2)}
    cpu = weights[0][0].cpu()
    peer_weights = torch.empty_like(cpu)
    if rank == 0:  # each rank learns the peer's rows once, for the exact check
        dist.send(cpu, 1)
        dist.recv(peer_weights, 1)
    else:
        dist.recv(peer_weights, 0)
        dist.send(cpu, 0)
    result = {"rank": rank}
    for name, plan in plans.items():
        times, device_ms = [], []
        for i in range(2 * reps):
            # even repetitions: host-timed call, stream idle; odd: device time
            # with the stream busy (as when the worker stages back to back),
            # so that only the pull's own device work shows
            busy = i % 2 == 1
            for view in buffer.slot(0):
                view.view(torch.uint8).fill_(0)
            # the peer's GPU work must be done too: two processes' kernels on
            # one GPU time-slice, which is not what is measured here
            torch.cuda.synchronize()
            dist.barrier()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            if busy:
                torch.cuda._sleep(2_000_000)
            start.record()
            t0 = time.perf_counter()
            received = transport.stage_layer(plan, rank, weights[0], buffer.slot(0))
            end.record()
            torch.cuda.synchronize()
            if busy:
                device_ms.append(start.elapsed_time(end))
            else:
                times.append(time.perf_counter() - t0)
            dist.barrier()  # no GPU work of the peer while this rank pulls
        pulls = bool(plan.ranks[rank].receives)
        exact = torch.equal(buffer.slot(0)[0].cpu(), peer_weights) if pulls else True
        result[name] = {
            "seconds": times,
            "device_ms": device_ms,
            "bytes": received,
            "bit_exact": exact,
        }
        dist.barrier()
    queue.put(result)
    dist.destroy_process_group()


def measure_ipc(reps: int, floor: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store_path = tempfile.mktemp(prefix="eplb-ipc-store-")
    procs = [
        ctx.Process(target=_ipc_rank, args=(r, store_path, reps, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(60)
    floor_gbps = floor["copy_GBps_one_way"]
    one_way = results[1]["one_way"]
    one_way_gbps = one_way["bytes"] / statistics.median(one_way["seconds"]) / 1e9
    device_gbps = one_way["bytes"] / statistics.median(one_way["device_ms"]) / 1e6
    # in the swap both ranks pull at once over the same HBM: aggregate rate
    swap = [r["swap"] for r in results]
    wall = [
        max(a, b) for a, b in zip(swap[0]["seconds"], swap[1]["seconds"], strict=True)
    ]
    swap_gbps = (swap[0]["bytes"] + swap[1]["bytes"]) / statistics.median(wall) / 1e9
    return {
        "layer_bytes": one_way["bytes"],
        "one_way_GBps": one_way_gbps,
        "one_way_vs_floor": one_way_gbps / floor_gbps,
        "one_way_device_GBps": device_gbps,
        "one_way_device_vs_floor": device_gbps / floor_gbps,
        "swap_aggregate_GBps": swap_gbps,
        "swap_vs_floor": swap_gbps / floor_gbps,
        "floor_GBps": floor_gbps,
        "bit_exact": all(
            r[m]["bit_exact"] for r in results for m in ("one_way", "swap")
        ),
    }


def measure_cuda_graph(backend: DeviceBackend) -> dict:
    """Toy MoE layer in a CUDA graph stays right across an in-place commit."""
    num_experts, slots, hidden, tokens, top_k = 8, 12, 256, 64, 2
    init_single_rank_group()
    gen = torch.Generator(device="cuda").manual_seed(0)
    logical = torch.randn(num_experts, hidden, hidden, device="cuda", generator=gen)
    old = torch.cat([torch.arange(num_experts), torch.tensor([0, 0, 1, 2])])
    maps = ExpertMaps(old[None], num_experts, slots - num_experts + 1, device="cuda")
    workspace = [logical[old.cuda()].contiguous()]
    x = torch.randn(tokens, hidden, device="cuda", generator=gen)
    ids = torch.randint(0, num_experts, (tokens, top_k), device="cuda", generator=gen)
    token_index = torch.arange(tokens, device="cuda")[:, None]

    def forward() -> torch.Tensor:
        count = maps.logcnt[0][ids]
        phys = torch.gather(
            maps.log2phy[0][ids], 2, (token_index % count)[..., None]
        ).squeeze(-1)
        w = workspace[0][phys]  # [T, k, H, H]
        return torch.einsum("th,tkhd->td", x, w)

    reference = torch.einsum("th,tkhd->td", x, logical[ids])
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    graph.replay()
    before_ok = torch.allclose(static_out, reference, rtol=1e-4, atol=1e-3)
    pointers = [
        maps.log2phy.data_ptr(),
        maps.logcnt.data_ptr(),
        workspace[0].data_ptr(),
    ]
    new = torch.tensor([5, 3, 3, 7, 6, 4, 2, 1, 0, 3, 5, 3])
    plan = plan_layer(old, new, 1, 1)
    buffer = StagingBuffer(workspace, backend)
    transport = make_transport("gloo-staged", backend=backend, group=dist.group.WORLD)
    worker = StagingWorker([workspace], buffer, transport, backend, rank=0)
    worker.start()
    worker.submit(1, {0: plan}, maps=maps, new_rows={0: new})
    deadline = time.monotonic() + 30
    while 0 not in worker.staged_layers():
        if worker.error is not None or time.monotonic() > deadline:
            raise RuntimeError(f"staging failed: {worker.error}")
        time.sleep(0.001)
    worker.commit_layer(0, maps)
    worker.stop()
    graph.replay()
    torch.cuda.synchronize()
    eager = forward()
    moved = not torch.equal(workspace[0], logical[old.cuda()])
    return {
        "replay_equals_eager_after_commit": bool(torch.equal(static_out, eager)),
        "replay_matches_reference_after_commit": bool(
            torch.allclose(static_out, reference, rtol=1e-4, atol=1e-3)
        ),
        "matched_before_commit": bool(before_ok),
        "weights_moved": bool(moved),
        "addresses_unchanged": pointers
        == [maps.log2phy.data_ptr(), maps.logcnt.data_ptr(), workspace[0].data_ptr()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="floor,commit,overlap,ipc,graph")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure")
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(0)
    backend = DeviceBackend.for_device("cuda:0")
    props = torch.cuda.get_device_properties(0)
    report: dict = {
        "device": props.name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": os.popen(
            "nvidia-smi --query-gpu=driver_version --format=csv,noheader"
        )
        .read()
        .strip(),
    }
    only = set(args.only.split(","))
    reps = 5 if args.quick else 30
    report["floor"] = measure_floor(reps)
    floor_ms = report["floor"]["copy_ms"]
    print("floor", json.dumps(report["floor"]), flush=True)
    if "commit" in only:
        report["commit"] = measure_commit(reps, floor_ms, backend)
        print("commit", json.dumps(report["commit"]), flush=True)
    if "overlap" in only:
        report["overlap"] = measure_overlap(
            steps=20 if args.quick else 200,
            num_layers=8 if args.quick else 58,
            backend=backend,
            staged_layers=8,
        )
        print("overlap", json.dumps(report["overlap"]), flush=True)
    if "graph" in only:
        report["cuda_graph"] = measure_cuda_graph(backend)
        print("cuda_graph", json.dumps(report["cuda_graph"]), flush=True)
    if "ipc" in only:
        report["ipc"] = measure_ipc(reps, report["floor"])
        print("ipc", json.dumps(report["ipc"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  driver {report['driver']}  torch {report['torch']}")
    f = report["floor"]
    print(
        f"floor  D2D copy of {f['layer_bytes'] / 1e6:.0f} MB: {f['copy_ms']:.3f} ms "
        f"({f['copy_TBps_read_plus_write']:.2f} TB/s read+write)"
    )
    for name, c in report.get("commit", {}).items():
        print(
            f"commit {name}: {c['device_ms_stream_busy']:.3f} ms device "
            f"(stream busy) = {c['vs_floor']:.2f}x floor (target <= 1.25x); "
            f"{c['device_ms_stream_idle']:.3f} ms with the stream idle, "
            f"{c['host_ms']:.3f} ms host"
        )
    if "overlap" in report:
        o = report["overlap"]
        print(
            f"overlap step {o['baseline_step_ms']:.2f} ms -> "
            f"{o['with_staging_step_ms']:.2f} ms = {o['slowdown_pct']:+.2f}% "
            f"(target <= 3%; baseline spread {o['baseline_spread_pct']:.2f}%)"
        )
    if "ipc" in report:
        i = report["ipc"]
        print(
            f"ipc    one-way pull of a layer: device {i['one_way_device_GBps']:.0f} "
            f"GB/s = {100 * i['one_way_device_vs_floor']:.0f}% of floor (target "
            f">= 80%); host-timed call {i['one_way_GBps']:.0f} GB/s = "
            f"{100 * i['one_way_vs_floor']:.0f}%; "
            f"2 ranks swapping: {i['swap_aggregate_GBps']:.0f} GB/s aggregate = "
            f"{100 * i['swap_vs_floor']:.0f}%; bit-exact {i['bit_exact']}"
        )
    if "cuda_graph" in report:
        print("graph ", report["cuda_graph"])


if __name__ == "__main__":
    sys.exit(main())
