"""What the replica consistency check costs: at start-up, and per committed layer.

Per rank, the check digests every local slot of every MoE layer on the
device, gathers the ``[layers, slots]`` digests over the EP group (only
integers travel) and compares every replica with its primary on the host.
This measures the three parts on DeepSeek-V3's geometry: 58 MoE layers,
256 experts + 32 redundant = 288 physical slots over ``--ranks`` EP ranks;
each expert as vLLM's FP8 layer holds it (w13 ``[2*I, H]`` and w2 ``[H, I]``
as bytes, block scales as fp32), with ``H = 7168 / --shrink`` and
``I = 2048 / --shrink`` (``--shrink 1``: the real 44 MB expert; larger
values make the experts small enough for a CPU machine, say which in the
results). The digest is memory-bound, so time scales with bytes.

Also measured: one committed layer's digest (all local slots: the commit
check's worst case, every slot changed).

    python benchmarks/eplb/bench_replica_check.py --device cpu --shrink 16
    python benchmarks/eplb/bench_replica_check.py --device cuda --shrink 1

Under torchrun (gloo) the digests are gathered over the ranks as in
``add_model``; alone, the gather is skipped (one rank).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.consistency import (
    CHUNK_ELEMENTS,
    expected_digests,
    find_stale_replicas,
    slot_digests,
    weights_digests,
)
from vllm.distributed.async_eplb.model_state import initial_row
from vllm.distributed.async_eplb.replica_check import gather_digests

LAYERS, EXPERTS, REDUNDANT = 58, 256, 32
HIDDEN, INTER, BLOCK = 7168, 2048, 128


def expert_layer(slots: int, shrink: int, device: str) -> list[torch.Tensor]:
    """One layer's local experts as vLLM's FP8 MoE holds them (uint8 views)."""
    hidden, inter = HIDDEN // shrink, INTER // shrink
    u8 = {"dtype": torch.uint8, "device": device}
    return [
        torch.randint(0, 256, (slots, 2 * inter, hidden), **u8),
        torch.randint(0, 256, (slots, hidden, inter), **u8),
        torch.rand(slots, -(-2 * inter // BLOCK), -(-hidden // BLOCK), device=device),
        torch.rand(slots, -(-hidden // BLOCK), -(-inter // BLOCK), device=device),
    ]


def sync(device: str) -> None:
    if device != "cpu":
        torch.accelerator.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    fn()  # warm-up: multiplier tables, allocator
    sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--ranks", type=int, default=32, help="EP ranks of the geometry"
    )
    parser.add_argument("--shrink", type=int, default=16)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk", type=int, default=CHUNK_ELEMENTS, help="words per digest kernel"
    )
    parser.add_argument(
        "--verify-cpu",
        action="store_true",
        help="check that layer 0's digests on the device equal a host copy's",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    physical = EXPERTS + REDUNDANT
    if physical % args.ranks:
        raise SystemExit(f"--ranks {args.ranks} does not divide {physical} slots")
    slots = physical // args.ranks
    group = None
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        if dist.get_world_size() != args.ranks:
            raise SystemExit(f"torchrun with {args.ranks} ranks (--ranks)")
    torch.manual_seed(0)
    weights = [
        expert_layer(slots, args.shrink, args.device) for _ in range(args.layers)
    ]
    row_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    total_bytes = row_bytes * slots * args.layers

    chunk = args.chunk
    digest_s = timed(lambda: weights_digests(weights, chunk), args.device, args.repeats)
    local = weights_digests(weights, chunk)
    if group is None:
        # One process: the other ranks' digests are copies of ours.
        joined = local.cpu().repeat(1, args.ranks)
        gather_s = [0.0]
    else:
        gather_s = timed(lambda: gather_digests(local, group), "cpu", args.repeats)
        joined = gather_digests(local, group)
    phy2log = torch.tensor(initial_row(EXPERTS, REDUNDANT)).expand(args.layers, -1)

    # Random contents: every replica differs from its primary (the worst
    # case); a healthy model's replicas digest like their primaries.
    healthy = expected_digests(phy2log, joined, EXPERTS).gather(1, phy2log)

    def compare(digests: torch.Tensor) -> None:
        find_stale_replicas(phy2log, digests, EXPERTS)
        expected_digests(phy2log, digests, EXPERTS)

    compare_s = timed(lambda: compare(healthy), "cpu", args.repeats)
    all_stale_s = timed(lambda: compare(joined), "cpu", args.repeats)
    layer_s = timed(lambda: slot_digests(weights[0], chunk), args.device, args.repeats)
    same_on_cpu = None
    if args.verify_cpu:
        host = [t.cpu() for t in weights[0]]
        same_on_cpu = bool(torch.equal(slot_digests(host).cpu(), local[0].cpu()))
    med = statistics.median
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "host": platform.node(),
        "device": args.device
        if args.device == "cpu"
        else torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else args.device,
        "torch_threads": torch.get_num_threads(),
        "geometry": f"{args.layers} layers x {physical} slots, EP{args.ranks}: "
        f"{slots} local slots",
        "shrink": args.shrink,
        "chunk_words": chunk,
        "device_digests_equal_cpu": same_on_cpu,
        "expert_bytes": row_bytes,
        "rank_bytes": total_bytes,
        "digest_s": round(med(digest_s), 4),
        "digest_GBps": round(total_bytes / med(digest_s) / 1e9, 2),
        "gather_ms": round(1000 * med(gather_s), 3),
        "compare_ms": round(1000 * med(compare_s), 3),
        "compare_all_stale_ms": round(1000 * med(all_stale_s), 3),
        "one_layer_ms": round(1000 * med(layer_s), 3),
        "startup_s": round(med(digest_s) + med(gather_s) + med(compare_s), 4),
    }
    if group is None or dist.get_rank() == 0:
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
