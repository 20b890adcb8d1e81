"""Where the host time of one ``p2p`` layer goes (issue 13), on two GPUs.

One DeepSeek-V3-shaped layer of one rank (9 x 44 MB; ``--layout flat``: one
uint8 tensor, ``deepseek-fp8``: vLLM's four FP8 tensors) moves from rank 0 to
rank 1. Host-timed on the receiver (stream idle, median of ``--reps``), each
variant against one contiguous NCCL send in the same run:

- ``floor``: ``dist.send`` / ``dist.recv`` of the layer's bytes;
- ``batch1``: the same bytes as a coalesced batch of one, posted straight on
  the process group as the transport posts a batch, then an event
  synchronised on the calling thread (the batch's own cost);
- ``transport``: ``P2PTransport.stage_layer`` as it is;
- ``transport-thread-per-layer``: the same with a fresh waiter thread for
  every layer (the wait as it was before issue 13c);
- ``transport-sync``: the same with its wait replaced by a plain event
  synchronise on the calling thread (no abort, no timeout): the bound for
  any abort-able wait;
- ``transport-plain``: the same posting each message as a plain send or
  receive instead of one coalesced batch (safe here: one peer, one way).

For ``transport``, each phase is stamped on both ranks with one clock
(``time.perf_counter``, CLOCK_MONOTONIC, shared by the processes of a host):
call, messages posted, wait entered and left, call returned. Printed as
medians relative to the receiver's call. The first call of each variant
(before any warm-up) is printed too: the first message between a pair of
ranks sets up NCCL's connections between them.

    python benchmarks/eplb/gpu/p2p_phases.py [--layout deepseek-fp8] --json phases.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_gpu import EXPERT_BYTES, EXPERTS_PER_RANK  # noqa: E402
from bench_multi_gpu import LAYOUTS, layout_bytes, split_layer  # noqa: E402
from torchrun_launch import relaunch_under_torchrun  # noqa: E402

from vllm.distributed.async_eplb.device import DeviceBackend  # noqa: E402
from vllm.distributed.async_eplb.planner import plan_layer  # noqa: E402
from vllm.distributed.async_eplb.staging import StagingBuffer  # noqa: E402
from vllm.distributed.async_eplb.transports import p2p  # noqa: E402
from vllm.distributed.async_eplb.transports.p2p import P2PTransport  # noqa: E402

STAMPS: dict[str, float] = {}


def stamped(name: str, fn: Callable) -> Callable:
    """``fn`` that stamps ``<name>.in`` and ``<name>.out``."""

    def wrapper(*args, **kwargs):
        STAMPS[f"{name}.in"] = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STAMPS[f"{name}.out"] = time.perf_counter()

    return wrapper


def sync_on_caller(works, peers, backend, timeout, should_abort, **kwargs) -> None:
    """The device wait without abort or timeout: an event synchronised on
    the calling thread."""
    for work in works:
        work.wait()
    done = backend.new_event()
    backend.record_event(done)
    backend.synchronize_event(done)


def plain_posts(group: dist.ProcessGroup) -> Callable:
    """``P2PTransport._post`` with each message a plain send or receive on
    the group, no coalesced batch (safe here: one peer, one direction)."""

    def post(messages, tag):
        works = [
            (group.send if m.is_send else group.recv)([m.rows], m.peer, tag)
            for m in messages
        ]
        return works, [[m.peer] for m in messages]

    return post


def variant(transport: P2PTransport, fn: Callable, change: str) -> Callable:
    """``fn`` with one part of the transport replaced: ``thread-per-layer``
    (a fresh waiter thread for every layer, as before issue 13c), ``sync``
    (the wait as :func:`sync_on_caller`) or ``plain`` (plain messages)."""

    def run() -> None:
        waiter, post, wait = transport._waiter, transport._post, p2p.wait_on_device
        if change == "thread-per-layer":
            transport._waiter = None
        elif change == "sync":
            p2p.wait_on_device = sync_on_caller
        elif change == "plain":
            transport._post = plain_posts(transport.group)
        try:
            fn()
        finally:
            transport._waiter, transport._post = waiter, post
            p2p.wait_on_device = wait

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="flat")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if "RANK" not in os.environ:
        return relaunch_under_torchrun(__file__, 2)
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo")
    staging = dist.new_group(backend="nccl")
    for group in (dist.group.WORLD, staging):
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    backend = DeviceBackend.for_device(device)
    slots = EXPERTS_PER_RANK

    def layer_of(owner: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(owner)
        shape = (slots, layout_bytes(args.layout, EXPERT_BYTES))
        return torch.randint(
            0, 256, shape, dtype=torch.uint8, device=device, generator=gen
        )

    rows = layer_of(rank)
    weights = split_layer(args.layout, rows)
    # rank 1's buffer must end up holding rank 0's layer, byte for byte
    expected = [w.view(torch.uint8) for w in split_layer(args.layout, layer_of(0))]
    row = list(range(2 * slots))
    new = row[:slots] + row[:slots]  # rank 1 takes rank 0's experts
    plan = plan_layer(row, new, 2, 2)
    buffer = StagingBuffer(weights, backend)
    flat = rows.view(-1)
    incoming = torch.empty_like(flat)
    transport = P2PTransport(backend, staging, timeout=60.0)

    def floor() -> None:
        if rank == 0:
            dist.send(flat, 1, group=staging)
        else:
            dist.recv(incoming, 0, group=staging)

    def batch1() -> None:
        staging._start_coalescing(device)
        if rank == 0:
            staging.send([flat], 1, 0)
        else:
            staging.recv([incoming], 0, 0)
        work = staging._end_coalescing(device)
        sync_on_caller([work], None, backend, 0, None)

    def stage() -> None:
        transport.stage_layer(plan, rank, weights, buffer.slot(0))

    transport._post = stamped("post", transport._post)
    p2p.wait_on_device = stamped("wait", p2p.wait_on_device)
    variants = {"floor": floor, "batch1": batch1, "transport": stage}
    for change in ("thread-per-layer", "sync", "plain"):
        variants[f"transport-{change}"] = variant(transport, stage, change)
    host: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, float] = {}
    phases: list[dict[str, float]] = []
    exact = {k: True for k in variants if k.startswith("transport")}
    for rep in range(args.reps + 3):
        for name, fn in variants.items():
            for view in buffer.slot(0):
                view.view(torch.uint8).fill_(0)  # poisoned: every byte must land
            torch.cuda.synchronize()
            dist.barrier(group=control)
            STAMPS.clear()
            end = torch.cuda.Event()
            t0 = time.perf_counter()
            fn()
            end.record()
            end.synchronize()
            t1 = time.perf_counter()
            if rep == 0:
                first[name] = (t1 - t0) * 1e3
            if rank == 1 and name in exact:
                exact[name] &= all(
                    torch.equal(got.view(torch.uint8), want)
                    for got, want in zip(buffer.slot(0), expected, strict=True)
                )
            if rep >= 3:
                host[name].append(t1 - t0)
                if name == "transport":
                    phases.append({"call": t0, **STAMPS, "return": t1})
    dist.barrier(group=control)
    everyone: list = [None, None]
    dist.all_gather_object(
        everyone,
        {"host": host, "phases": phases, "first": first, "exact": exact},
        group=control,
    )
    if rank == 1:
        nbytes = flat.numel()
        rows = {}
        for name, times in everyone[1]["host"].items():
            med = statistics.median(times)
            rows[name] = {"ms": med * 1e3, "GBps": nbytes / med / 1e9}
        for r in rows.values():
            r["vs_floor"] = rows["floor"]["ms"] / r["ms"]
        rel: dict[str, list[float]] = {}
        for recv, send in zip(
            everyone[1]["phases"], everyone[0]["phases"], strict=True
        ):
            for side, stamps in (("recv", recv), ("send", send)):
                for key, value in stamps.items():
                    rel.setdefault(f"{side}.{key}", []).append(
                        (value - recv["call"]) * 1e3
                    )
        medians = {k: statistics.median(v) for k, v in rel.items()}
        exact = everyone[1]["exact"]
        for name, r in rows.items():
            r["first_call_ms"] = max(v["first"][name] for v in everyone)
            if name in exact:
                r["bit_exact"] = exact[name]
        print(f"layout {args.layout}, {nbytes / 1e6:.1f} MB, median of {args.reps}")
        print(f"bit-exact: {all(exact.values())}")
        head = f"{'variant':24s} {'ms':>7s} {'GB/s':>7s} {'vs floor':>9s}"
        print(f"{head} {'first call ms':>14s}")
        for name, r in rows.items():
            pct = 100 * r["vs_floor"]
            print(
                f"{name:24s} {r['ms']:7.3f} {r['GBps']:7.1f} {pct:8.1f}% "
                f"{r['first_call_ms']:14.1f}"
            )
        print("transport phases, ms after the receiver's call (median):")
        for key, value in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {key:24s} {value:8.3f}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "layout": args.layout,
                        "reps": args.reps,
                        "rows": rows,
                        "phases_ms": medians,
                        "bit_exact": all(exact.values()),
                    },
                    indent=2,
                )
            )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
