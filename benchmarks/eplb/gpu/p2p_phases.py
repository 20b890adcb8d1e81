"""Where the host time of one ``p2p`` layer goes (issue 13), on two GPUs.

One DeepSeek-V3-shaped layer of one rank (9 x 44 MB, one uint8 tensor) moves
from rank 0 to rank 1. Host-timed on the receiver (stream idle, median of
``--reps``), each variant against one contiguous NCCL send in the same run:

- ``floor``: ``dist.send`` / ``dist.recv`` of the layer's bytes;
- ``batch1``: the same bytes as one ``batch_isend_irecv`` of one op, then
  an event synchronised on the calling thread (NCCL's coalesced path alone);
- ``transport``: ``P2PTransport.stage_layer`` as it is;
- ``transport-batchapi``: the same posting its batch through
  ``dist.batch_isend_irecv`` instead of straight on the process group;
- ``transport-sync``: the same with its wait replaced by a plain event
  synchronise on the calling thread (no helper thread, no abort check): the
  cost of the abort-able wait.

For ``transport``, every phase is stamped on both ranks with one clock
(``time.perf_counter``, CLOCK_MONOTONIC, shared by the processes of a host):
call, batch posted, wait entered, device done (seen by the helper thread),
call returned. Printed as medians relative to the receiver's call.

    python benchmarks/eplb/gpu/p2p_phases.py --json phases.json
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


def install_probes() -> None:
    """Stamp the batch, the wait, and the helper thread's device wait."""
    dist.batch_isend_irecv = stamped("post", dist.batch_isend_irecv)
    p2p.wait_on_device = stamped("wait", p2p.wait_on_device)
    original = p2p._wait_on_thread

    def wait_on_thread(block, *args, **kwargs):
        return original(stamped("device", block), *args, **kwargs)

    p2p._wait_on_thread = wait_on_thread


def sync_on_caller(works, peers, backend, timeout, should_abort, **kwargs) -> None:
    """``wait_on_device`` without the helper thread (no abort, no timeout)."""
    for work in works:
        work.wait()
    done = backend.new_event()
    backend.record_event(done)
    backend.synchronize_event(done)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=40)
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
    gen = torch.Generator(device=device).manual_seed(rank)
    weights = [
        torch.randint(
            0,
            256,
            (slots, EXPERT_BYTES),
            dtype=torch.uint8,
            device=device,
            generator=gen,
        )
    ]
    row = list(range(2 * slots))
    new = row[:slots] + row[:slots]  # rank 1 takes rank 0's experts
    plan = plan_layer(row, new, 2, 2)
    buffer = StagingBuffer(weights, backend)
    flat = weights[0].view(-1)
    incoming = torch.empty_like(flat)
    transport = P2PTransport(backend, staging, timeout=60.0)
    install_probes()

    def floor() -> None:
        if rank == 0:
            dist.send(flat, 1, group=staging)
        else:
            dist.recv(incoming, 0, group=staging)

    def batch1() -> None:
        op = (dist.isend, flat, 1) if rank == 0 else (dist.irecv, incoming, 0)
        works = dist.batch_isend_irecv([dist.P2POp(op[0], op[1], op[2], staging)])
        sync_on_caller(works, None, backend, 0, None)

    def stage() -> None:
        transport.stage_layer(plan, rank, weights, buffer.slot(0))

    original_wait = p2p.wait_on_device

    def stage_sync() -> None:
        p2p.wait_on_device = sync_on_caller
        try:
            stage()
        finally:
            p2p.wait_on_device = original_wait

    def stage_batchapi() -> None:
        coalesces, transport._coalesces = transport._coalesces, False
        try:
            stage()
        finally:
            transport._coalesces = coalesces

    variants = {
        "floor": floor,
        "batch1": batch1,
        "transport": stage,
        "transport-batchapi": stage_batchapi,
        "transport-sync": stage_sync,
    }
    host: dict[str, list[float]] = {k: [] for k in variants}
    phases: list[dict[str, float]] = []
    for rep in range(args.reps + 3):
        for name, fn in variants.items():
            torch.cuda.synchronize()
            dist.barrier(group=control)
            STAMPS.clear()
            end = torch.cuda.Event()
            t0 = time.perf_counter()
            fn()
            end.record()
            end.synchronize()
            t1 = time.perf_counter()
            if rep >= 3:
                host[name].append(t1 - t0)
                if name == "transport":
                    phases.append({"call": t0, **STAMPS, "return": t1})
    got = buffer.slot(0)[0]
    dist.barrier(group=control)
    everyone: list = [None, None]
    dist.all_gather_object(
        everyone, {"host": host, "phases": phases, "weights": None}, group=control
    )
    sent: list = [None, None]
    dist.all_gather_object(sent, weights[0].cpu() if rank == 0 else None, group=control)
    exact = rank == 0 or torch.equal(got.cpu(), sent[0])
    exact_all: list = [None, None]
    dist.all_gather_object(exact_all, exact, group=control)
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
        print(f"bit-exact: {all(exact_all)}")
        print(f"{'variant':16s} {'ms':>7s} {'GB/s':>7s} {'vs floor':>9s}")
        for name, r in rows.items():
            pct = 100 * r["vs_floor"]
            print(f"{name:16s} {r['ms']:7.3f} {r['GBps']:7.1f} {pct:8.1f}%")
        print("transport phases, ms after the receiver's call (median):")
        for key, value in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {key:24s} {value:8.3f}")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"rows": rows, "phases_ms": medians, "bit_exact": all(exact_all)},
                    indent=2,
                )
            )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
