"""torchrun script (CUDA, torch only): ``ipc`` staging between processes.

Ranks may share one GPU (CUDA IPC works between processes on one device).
1. Bit-exactness and rate: stage + commit every layer through ``ipc``; the
   staged bytes per second against the same-run device-to-device copy rate.
2. Overlap: the StagingWorker stages every layer on its side stream while the
   main stream runs matrix products; prints the main stream's slowdown.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import plan_layers
from vllm.distributed.async_eplb.staging import StagingBuffer, copy_slot_runs, slot_runs
from vllm.distributed.async_eplb.transports import make_transport
from vllm.distributed.async_eplb.worker import StagingWorker

SLOTS = 9


def expert_tensors(layer: int, expert: int, hidden: int, inter: int, device):
    n13, n2 = 2 * inter * hidden, hidden * inter
    base = (layer * 131 + expert * 29) % 251
    w13 = (torch.arange(n13, device=device) % 251 + base).to(torch.uint8)
    w2 = (torch.arange(n2, device=device) % 241 + base).to(torch.uint8)
    scale = torch.full((hidden // 128,), float(layer * 1000 + expert), device=device)
    return [w13.view(2 * inter, hidden), w2.view(hidden, inter), scale]


def build(rows, rank, hidden, inter, device):
    return [
        [
            torch.stack(list(ts))
            for ts in zip(
                *(
                    expert_tensors(layer, e, hidden, inter, device)
                    for e in row[rank * SLOTS : (rank + 1) * SLOTS]
                ),
                strict=True,
            )
        ]
        for layer, row in enumerate(rows)
    ]


def placement(rng, experts, slots):
    row = list(range(experts)) + [
        rng.randrange(experts) for _ in range(slots - experts)
    ]
    rng.shuffle(row)
    return row


def cuda_seconds(backend, fn) -> float:
    start, end = torch.Event(enable_timing=True), torch.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    backend.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scale", type=int, default=2, help="divide H=7168, I=2048")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.accelerator.device_count())
    torch.accelerator.set_device_index(device.index)
    backend = DeviceBackend.for_device(device)
    hidden, inter = 7168 // args.scale, 2048 // args.scale
    slots, experts = world * SLOTS, world * (SLOTS - 1)
    rng = random.Random(0)
    old = [placement(rng, experts, slots) for _ in range(args.layers)]
    new = [placement(rng, experts, slots) for _ in range(args.layers)]
    plans = plan_layers(torch.tensor(old), torch.tensor(new), world, world)
    weights = build(old, rank, hidden, inter, device)
    expected = build(new, rank, hidden, inter, device)
    transport = make_transport(
        "ipc",
        backend=backend,
        group=dist.new_group(backend="gloo"),  # reserved for staging
        expert_weights=weights,
        ranks_per_node=world,
    )
    buffer = StagingBuffer(weights[0], backend, ring_size=args.layers)

    # 1. rate and bit-exactness, one layer at a time.
    layer_bytes = buffer.layout.row_bytes * SLOTS
    src = torch.empty(layer_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    floor = min(cuda_seconds(backend, lambda: dst.copy_(src)) for _ in range(5))
    stage_s, received = 0.0, 0
    for layer, plan in enumerate(plans):
        dist.barrier()

        def stage(layer=layer, plan=plan):
            nonlocal received
            received += transport.stage_layer(
                plan,
                rank,
                weights[layer],
                buffer.slot(layer),
                packed=buffer.packed(layer),
            )

        stage_s += cuda_seconds(backend, stage)
    dist.barrier()  # every rank has read the old weights: commit
    for layer, plan in enumerate(plans):
        changed = plan.ranks[rank].changed_slots
        copy_slot_runs(weights[layer], buffer.slot(layer), slot_runs(changed, changed))
    backend.synchronize()
    for layer in range(args.layers):
        for got, want in zip(weights[layer], expected[layer], strict=True):
            assert torch.equal(got, want), f"rank {rank} layer {layer} differs"
    rate, floor_rate = received / stage_s, layer_bytes / floor
    print(
        f"RATE rank {rank}: ipc {rate / 1e9:.1f} GB/s, d2d copy floor "
        f"{floor_rate / 1e9:.1f} GB/s, ratio {100 * rate / floor_rate:.1f}% "
        f"({received / 1e6:.0f} MB received)",
        flush=True,
    )

    # 2. overlap: weights are now the new placement; stage back to the old.
    back = plan_layers(torch.tensor(new), torch.tensor(old), world, world)
    worker = StagingWorker(weights, buffer, transport, backend, rank=rank)
    worker.start()
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    c = torch.empty_like(a)

    def step():
        for _ in range(8):
            torch.mm(a, b, out=c)

    step()
    results = []
    for job in range(5):
        dist.barrier()
        alone = cuda_seconds(backend, step)
        dist.barrier()
        worker.submit(job, dict(enumerate(back)))
        t0 = time.perf_counter()
        with_staging = cuda_seconds(backend, step)
        while len(worker.staged_layers()) < args.layers:
            assert worker.error is None, worker.error
            assert time.perf_counter() - t0 < 60, "staging never finished"
            time.sleep(0.001)
        worker.cancel()  # nothing committed: the workspace stays as it was
        results.append((alone, with_staging, worker.stats.seconds))
    worker.stop()
    alone = sorted(r[0] for r in results)[2]
    shared = sorted(r[1] for r in results)[2]
    staging = sorted(r[2] for r in results)[2]
    print(
        f"OVERLAP rank {rank}: step {alone * 1e3:.2f} ms alone, "
        f"{shared * 1e3:.2f} ms while staging {args.layers} layers "
        f"({staging * 1e3:.2f} ms of staging): slowdown "
        f"{100 * (shared / alone - 1):.1f}%",
        flush=True,
    )
    for layer in range(args.layers):
        for got, want in zip(weights[layer], expected[layer], strict=True):
            assert torch.equal(got, want), "cancelled staging changed the workspace"
    print(f"OK rank {rank}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
