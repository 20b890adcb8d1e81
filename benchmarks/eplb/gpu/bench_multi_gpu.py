"""Several GPUs of one host (issue 8): transports at link speed, and safety.

One process per GPU, torch + numpy only (no vLLM). Two parts, one run:

1. transfer: one DeepSeek-V3-shaped layer of one rank (9 experts x 44 MB,
   FP8 as uint8) moved from one GPU to another by the ``p2p`` transport (NCCL
   staging group, as ``staging_backend("p2p", "cuda")`` says) and by ``ipc``,
   against the link floor of the same run: one contiguous NCCL send of the
   same bytes. Device-timed (events, stream kept busy so only the transfer
   shows) and host-timed; bit-exact. Pairs: 0 -> 1, every ordered pair at 4+.
2. safety: every rank runs a stand-in forward on its main stream (an NCCL
   all-to-all of a few MB plus bf16 matrix products per step) while its
   ``StagingWorker`` stages full rebalances on its side stream; the main loop
   commits one layer at most per step, only after a non-blocking readiness
   vote (``agreement.NonBlockingVote`` on a private gloo group) said every
   rank has staged it. After each rebalance the weights and maps are checked
   bit-exact against the expected placement. A watchdog ends the run (exit 3)
   when a rank makes no progress for ``--timeout`` seconds. The forward's
   step time per transport is compared with runs that stage nothing.

    torchrun --nproc-per-node=2 benchmarks/eplb/gpu/bench_multi_gpu.py --json o.json
    python benchmarks/eplb/gpu/bench_multi_gpu.py --num-ranks 4 --json o.json
    python benchmarks/eplb/gpu/bench_multi_gpu.py --device cpu --num-ranks 2 \\
        --expert-bytes 4096 --steps 60 --rebalances 5   # logic check, gloo only

Relaunches itself under torchrun when not started by it. NVLink multicast is
kept off (NCCL_NVLS_ENABLE=0 and friends) before NCCL starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

# Before torch.distributed / NCCL start: no NVLink multicast (see the device
# README: it is not usable on the lent machines).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/eplb: torchrun_launch, bench_*
sys.path.insert(0, str(HERE))

from bench_gpu import EXPERT_BYTES, EXPERTS_PER_RANK  # noqa: E402
from bench_transfer import placement  # noqa: E402
from torchrun_launch import relaunch_under_torchrun  # noqa: E402

from vllm.distributed.async_eplb.agreement import NonBlockingVote  # noqa: E402
from vllm.distributed.async_eplb.device import DeviceBackend  # noqa: E402
from vllm.distributed.async_eplb.maps import ExpertMaps  # noqa: E402
from vllm.distributed.async_eplb.planner import plan_layer, plan_layers  # noqa: E402
from vllm.distributed.async_eplb.staging import StagingBuffer  # noqa: E402
from vllm.distributed.async_eplb.transports import (  # noqa: E402
    make_transport,
    staging_backend,
)
from vllm.distributed.async_eplb.worker import StagingWorker  # noqa: E402

BASELINE = "none"
# ``ipc`` as a multi-node deployment gets it between nodes: every GPU its own
# node (ranks_per_node=1), so ``auto`` on CUDA stages through pinned host
# memory and gloo.
CROSS_NODE = "ipc-rpn1"
# ``<transport>-rows``: the same transport with the staging buffer laid out by
# expert (interleaved rows, the CPU layout) instead of by tensor.
ROWS = "-rows"
# Per tensor of one expert: (shape, dtype). DeepSeek-V3 FP8: w13, w2 and their
# block scales (128 x 128 blocks, float32), as vLLM's FP8 MoE holds them.
LAYOUTS: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {
    "flat": [],  # one uint8 tensor of --expert-bytes
    "deepseek-fp8": [
        ((4096, 7168), torch.uint8),
        ((7168, 2048), torch.uint8),
        ((32, 56), torch.float32),
        ((56, 16), torch.float32),
    ],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--num-ranks", type=int, default=0, help="0: all GPUs (cpu: 2)")
    p.add_argument(
        "--transports", default="", help="cuda: p2p,ipc; cpu: p2p,gloo-staged"
    )
    p.add_argument("--only", default="transfer,safety")
    p.add_argument("--expert-bytes", type=int, default=EXPERT_BYTES)
    p.add_argument(
        "--layout",
        default="flat",
        choices=sorted(LAYOUTS),
        help="transfer part: the layer's weight tensors (flat: one uint8 tensor)",
    )
    p.add_argument("--experts-per-rank", type=int, default=EXPERTS_PER_RANK)
    p.add_argument("--reps", type=int, default=20, help="transfer repetitions")
    p.add_argument("--steps", type=int, default=2000, help="at least, per run")
    p.add_argument("--rebalances", type=int, default=50, help="at least, per run")
    p.add_argument("--layers", type=int, default=8, help="MoE layers rebalanced")
    p.add_argument("--ring", type=int, default=2, help="staging ring slots")
    p.add_argument("--a2a-bytes", type=int, default=4 << 20, help="per rank")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--dim", type=int, default=8192, help="matmul width")
    p.add_argument("--matmuls", type=int, default=4)
    p.add_argument("--vote-delay", type=int, default=2, help="steps")
    p.add_argument("--vote-gap", type=int, default=1, help="steps")
    p.add_argument("--timeout", type=float, default=300.0, help="watchdog, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.device == "cpu" and args.dim == 8192:  # tiny CPU defaults
        args.tokens, args.dim = 8, 32
    if args.device == "cpu" and args.a2a_bytes == 4 << 20:
        args.a2a_bytes = 4096
    return args


# ---- process setup -----------------------------------------------------


class Watchdog:
    """Ends the process (exit 3) when ``beat`` is not called for ``timeout`` s.

    A hung collective never returns, so only a separate thread can fail the
    run; torchrun then stops the other ranks.
    """

    def __init__(self, rank: int, timeout: float) -> None:
        self.rank, self.timeout = rank, timeout
        self.where = "start"
        self.last = time.monotonic()
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()

    def beat(self, where: str) -> None:
        self.where, self.last = where, time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(
                    f"WATCHDOG rank {self.rank}: no progress for {idle:.0f} s "
                    f"at {self.where}: hang",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(3)


class Ctx:
    """Rank, device, process groups, and the run's knobs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        timeout = timedelta(seconds=args.timeout)
        if args.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", timeout=timeout, device_id=self.device)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world < 2:
            raise ValueError(f"needs at least 2 ranks, got {self.world}")
        self.backend = DeviceBackend.for_device(self.device)
        self.is_cuda = self.device.type == "cuda"
        # Every group is created by every rank in the same order.
        self.forward_group = dist.group.WORLD  # the stand-in's all-to-all
        self.control = dist.new_group(backend="gloo")  # barriers, results
        self.vote_group = dist.new_group(backend="gloo")  # readiness votes only
        self.staging = {
            name: dist.new_group(backend=staging_backend(name, self.device.type))
            for name in ("p2p", "gloo-staged")
        }
        self.staging["ipc"] = self.staging["gloo-staged"]
        self.floor_group = self.staging["p2p"]  # NCCL on CUDA, gloo on CPU
        # NCCL communicators start now, with every rank present: a first
        # batched point-to-point call involving only two ranks would not.
        for group in {id(g): g for g in self.staging.values()}.values():
            on_device = dist.get_backend(group) == "nccl"
            warm = torch.zeros(1, device=self.device if on_device else "cpu")
            dist.all_reduce(warm, group=group)
        self.watchdog = Watchdog(self.rank, args.timeout)

    def barrier(self) -> None:
        self.backend.synchronize()
        dist.barrier(group=self.control)

    def gather(self, obj: object) -> list:
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out


def expert_content(ctx: Ctx, layer: int, expert: int) -> torch.Tensor:
    """The bytes of logical expert ``expert`` of ``layer``: seeded, distinct."""
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(ctx.args.seed * 1_000_003 + layer * 10_007 + expert)
    return torch.randint(
        0,
        256,
        (ctx.args.expert_bytes,),
        dtype=torch.uint8,
        device=ctx.device,
        generator=gen,
    )


def rank_layer(ctx: Ctx, layer: int, row: list[int], rank: int) -> torch.Tensor:
    """``[S, expert_bytes]`` workspace of ``rank`` under placement ``row``."""
    s = ctx.args.experts_per_rank
    return torch.stack(
        [expert_content(ctx, layer, e) for e in row[rank * s : (rank + 1) * s]]
    )


class Timer:
    """Host time always; device time (events) on CUDA, else the host time."""

    def __init__(self, ctx: Ctx, busy_stream: bool) -> None:
        self.ctx, self.busy = ctx, busy_stream

    def __enter__(self) -> Timer:
        if self.ctx.is_cuda:
            if self.busy:  # queued work: host launch time does not show
                torch.cuda._sleep(2_000_000)
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ctx.is_cuda:
            # this stream's work only: the worker's side stream runs on
            self.end.record()
            self.end.synchronize()
        self.host_s = time.perf_counter() - self.t0
        self.device_s = (
            self.start.elapsed_time(self.end) / 1e3 if self.ctx.is_cuda else self.host_s
        )


# ---- part 1: one layer from one GPU to another ---------------------------


def layout_bytes(layout: str, expert_bytes: int) -> int:
    """Bytes of one expert, all tensors of ``layout`` included."""
    spec = LAYOUTS[layout]
    if not spec:
        return expert_bytes
    return sum(
        torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        for shape, dt in spec
    )


def split_layer(layout: str, rows: torch.Tensor) -> list[torch.Tensor]:
    """The layer's weight tensors cut from ``[S, bytes]`` rows (contiguous)."""
    spec = LAYOUTS[layout]
    if not spec:
        return [rows]
    out, offset = [], 0
    for shape, dt in spec:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        part = rows[:, offset : offset + nbytes].contiguous()
        out.append(part.view(dt).view(rows.shape[0], *shape))
        offset += nbytes
    return out


def one_way_row(world: int, slots: int, src: int, dst: int) -> list[int]:
    """Placement where ``dst``'s slots take ``src``'s experts (the rest stays)."""
    row = list(range(world * slots))
    row[dst * slots : (dst + 1) * slots] = row[src * slots : (src + 1) * slots]
    return row


def time_floor(ctx: Ctx, src: int, dst: int, data: torch.Tensor) -> dict:
    """One contiguous send of the layer's bytes on the staging group."""
    dev, host = [], []
    for i in range(2 * ctx.args.reps):
        ctx.barrier()
        with Timer(ctx, busy_stream=i % 2 == 1) as t:
            if ctx.rank == src:
                dist.send(data, dst, group=ctx.floor_group)
            elif ctx.rank == dst:
                dist.recv(data, src, group=ctx.floor_group)
        (dev if i % 2 else host).append(t.device_s if i % 2 else t.host_s)
    return {"device_s": dev, "host_s": host}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Compare weights as bytes: random bytes seen as floats can be NaN."""
    return t.view(torch.uint8)


def time_transport(ctx: Ctx, name: str, src: int, dst: int, plan, weights) -> dict:
    by_tensor = not name.endswith(ROWS)
    name = name.removesuffix(ROWS)
    kind = "ipc" if name == CROSS_NODE else name
    transport = make_transport(
        kind,
        backend=ctx.backend,
        group=ctx.staging[kind],
        expert_weights=[weights],
        ranks_per_node=1 if name == CROSS_NODE else ctx.world,
        timeout=ctx.args.timeout,
    )
    buffer = StagingBuffer(weights, ctx.backend, by_tensor=by_tensor)
    expected = split_layer(
        ctx.args.layout,
        rank_layer(ctx, 0, list(range(ctx.world * plan.slots_per_rank)), src),
    )
    dev, host, exact, received = [], [], True, 0
    for i in range(2 * ctx.args.reps):
        for view in buffer.slot(0):
            view.view(torch.uint8).fill_(0)
        ctx.barrier()
        with Timer(ctx, busy_stream=i % 2 == 1) as t:
            received = transport.stage_layer(
                plan, ctx.rank, weights, buffer.slot(0), packed=buffer.packed(0)
            )
        (dev if i % 2 else host).append(t.device_s if i % 2 else t.host_s)
        if ctx.rank == dst:
            exact &= all(
                torch.equal(_bytes(got), _bytes(want))
                for got, want in zip(buffer.slot(0), expected, strict=True)
            )
    del transport
    return {"device_s": dev, "host_s": host, "bit_exact": exact, "bytes": received}


def rates(nbytes: int, timed: dict) -> dict:
    return {
        "device_GBps": nbytes / statistics.median(timed["device_s"]) / 1e9,
        "host_GBps": nbytes / statistics.median(timed["host_s"]) / 1e9,
    }


def run_transfer(ctx: Ctx, transports: list[str]) -> dict:
    s = ctx.args.experts_per_rank
    row = list(range(ctx.world * s))
    rows = rank_layer(ctx, 0, row, ctx.rank)
    weights = split_layer(ctx.args.layout, rows)
    nbytes = rows.numel()
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    scratch.copy_(rows.view(-1))
    pairs = (
        [(0, 1)]
        if ctx.world == 2
        else [(a, b) for a in range(ctx.world) for b in range(ctx.world) if a != b]
    )
    out = []
    for src, dst in pairs:
        ctx.watchdog.beat(f"transfer {src}->{dst}")
        plan = plan_layer(
            row, one_way_row(ctx.world, s, src, dst), ctx.world, ctx.world
        )
        floor = time_floor(ctx, src, dst, scratch)
        floor_exact = ctx.rank != dst or torch.equal(
            scratch, rank_layer(ctx, 0, row, src).view(-1)
        )
        scratch.copy_(rows.view(-1))
        per = {"floor": rates(nbytes, floor)}
        exact = {"floor": floor_exact}
        for name in transports:
            timed = time_transport(ctx, name, src, dst, plan, weights)
            per[name] = rates(nbytes, timed)
            exact[name] = timed["bit_exact"]
            if ctx.rank == dst and timed["bytes"] != nbytes:
                raise AssertionError(f"{name}: {timed['bytes']} B staged, not {nbytes}")
        # the receiver's times are the transfer's; every rank's exactness counts
        views = ctx.gather({"rates": per, "exact": exact})
        merged = views[dst]["rates"]
        for name, r in merged.items():
            if name != "floor":
                for kind in ("device", "host"):
                    r[f"{kind}_vs_floor"] = (
                        r[f"{kind}_GBps"] / merged["floor"][f"{kind}_GBps"]
                    )
            r["bit_exact"] = all(v["exact"][name] for v in views)
        out.append({"src": src, "dst": dst, "bytes": nbytes, **merged})
    return {"pairs": out}


# ---- part 2: safety beside a live all-to-all ------------------------------


class StandInForward:
    """An all-to-all of ``a2a_bytes`` per rank, then a few products (bf16 on GPU)."""

    def __init__(self, ctx: Ctx) -> None:
        a = ctx.args
        dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = max(ctx.world, a.a2a_bytes // itemsize // ctx.world * ctx.world)
        self.group = ctx.forward_group
        self.send = torch.randn(numel, dtype=dtype, device=ctx.device)
        self.recv = torch.empty_like(self.send)
        self.x = torch.randn(a.tokens, a.dim, dtype=dtype, device=ctx.device)
        self.w = [
            torch.randn(a.dim, a.dim, dtype=dtype, device=ctx.device) * a.dim**-0.5
            for _ in range(a.matmuls)
        ]

    def step(self) -> None:
        dist.all_to_all_single(self.recv, self.send, group=self.group)
        h = self.x
        for w in self.w:
            h = torch.tanh(h @ w)
        self.send[: h.numel()].copy_(h.view(-1)[: self.send.numel()])


class Rebalancer:
    """One transport's worker, the model's weights and maps, and the job state.

    Every decision (submit, commit, stop) depends only on the step counter
    and on votes every rank read at the same step, so it is the same on all
    ranks without any blocking collective.
    """

    def __init__(self, ctx: Ctx, name: str) -> None:
        a = ctx.args
        self.ctx, self.name = ctx, name
        self.slots = ctx.world * a.experts_per_rank
        self.experts = ctx.world * (a.experts_per_rank - 1)  # 1 redundant per rank
        self.rng = random.Random(a.seed)  # same stream on every rank
        self.rows = [
            placement(self.rng, self.experts, self.slots) for _ in range(a.layers)
        ]
        self.weights = [
            [rank_layer(ctx, layer, row, ctx.rank)]
            for layer, row in enumerate(self.rows)
        ]
        self.maps = ExpertMaps(
            torch.tensor(self.rows),
            self.experts,
            max_replicas=ctx.world + 1,  # 1 + every redundant slot
            device=ctx.device,
        )
        transport = make_transport(
            name,
            backend=ctx.backend,
            group=ctx.staging[name],
            expert_weights=self.weights,
            ranks_per_node=ctx.world,
            timeout=a.timeout,
        )
        buffer = StagingBuffer(self.weights[0], ctx.backend, ring_size=a.ring)
        self.worker = StagingWorker(
            self.weights, buffer, transport, ctx.backend, rank=ctx.rank
        )
        self.worker.start()
        self.vote = NonBlockingVote(
            ctx.vote_group, a.vote_delay, a.timeout, launch_gap=a.vote_gap
        )
        self.job = 0
        self.new_rows: list[list[int]] | None = None
        self.next_layer = 0
        self.rebalances = 0
        self.commits = 0
        self.checks_failed: list[str] = []
        self.staged_bytes = 0
        self.staged_s: list[float] = []

    @property
    def in_flight(self) -> bool:
        return self.new_rows is not None

    def between_steps(self, step: int) -> None:
        """What EplbState does between two engine steps."""
        if not self.in_flight:
            self._submit()
        if self.vote.may_launch(step, "ready"):
            staged = self.next_layer in self.worker.staged_layers()
            failed = self.worker.error is not None
            self.vote.launch(step, "ready", [int(staged), int(failed)], self.next_layer)
        for result in self.vote.collect(step):
            ready, failed = (int(x) for x in result.total)
            if failed:
                mine = self.worker.error
                raise RuntimeError(f"staging failed on {failed} rank(s); here: {mine}")
            if ready == self.ctx.world:
                self._commit(result.context)

    def _submit(self) -> None:
        a = self.ctx.args
        self.new_rows = [
            placement(self.rng, self.experts, self.slots) for _ in range(a.layers)
        ]
        plans = plan_layers(
            torch.tensor(self.rows),
            torch.tensor(self.new_rows),
            self.ctx.world,
            self.ctx.world,
        )
        self.job += 1
        self.next_layer = 0
        self.worker.submit(
            self.job,
            dict(enumerate(plans)),
            maps=self.maps,
            new_rows={i: torch.tensor(r) for i, r in enumerate(self.new_rows)},
        )

    def _commit(self, layer: int) -> None:
        if layer != self.next_layer:
            raise AssertionError(f"vote for layer {layer}, expected {self.next_layer}")
        self.worker.commit_layer(layer, self.maps)
        self.commits += 1
        self.next_layer += 1
        if self.next_layer == len(self.rows):
            stats = self.worker.stats
            self.staged_bytes += stats.bytes_received
            self.staged_s += list(stats.layer_seconds.values())
            self.rows, self.new_rows = self.new_rows, None
            self.rebalances += 1
            self._check()

    def _check(self) -> None:
        """Every local slot holds its expert's bytes; maps equal the placement."""
        r, s = self.ctx.rank, self.ctx.args.experts_per_rank
        for layer, row in enumerate(self.rows):
            for slot, expert in enumerate(row[r * s : (r + 1) * s]):
                if not torch.equal(
                    self.weights[layer][0][slot],
                    expert_content(self.ctx, layer, expert),
                ):
                    self.checks_failed.append(
                        f"rebalance {self.rebalances} layer {layer} slot {slot}"
                    )
        if self.maps.phy2log.tolist() != self.rows:
            self.checks_failed.append(f"rebalance {self.rebalances} maps")

    def stop(self) -> None:
        self.worker.stop()
        if self.worker.error is not None:
            raise RuntimeError(f"staging worker: {self.worker.error}")


def run_forward(ctx: Ctx, name: str) -> dict:
    """Step the stand-in forward; with a transport, rebalance meanwhile."""
    a = ctx.args
    model = StandInForward(ctx)
    eplb = Rebalancer(ctx, name) if name != BASELINE else None
    ctx.barrier()
    forward_s, loop_s = [], []
    step = 0
    max_steps = 20 * max(a.steps, a.rebalances * a.layers * (a.vote_delay + a.vote_gap))
    start = time.perf_counter()
    while True:
        ctx.watchdog.beat(f"{name} step {step}")
        t0 = time.perf_counter()
        with Timer(ctx, busy_stream=False) as t:  # the engine reads its tokens
            model.step()
        if eplb is not None:
            eplb.between_steps(step)
        forward_s.append(t.device_s)
        loop_s.append(time.perf_counter() - t0)
        step += 1
        done = eplb is None or (eplb.rebalances >= a.rebalances and not eplb.in_flight)
        if step >= a.steps and done:
            break
        if step >= max_steps:
            raise RuntimeError(
                f"{name}: only {eplb.rebalances if eplb else 0} rebalances "
                f"in {step} steps"
            )
    wall = time.perf_counter() - start
    result = {
        "steps": step,
        "wall_s": wall,
        "forward_ms_median": 1e3 * statistics.median(forward_s),
        "forward_ms_mean": 1e3 * statistics.fmean(forward_s),
        "forward_ms_p99": 1e3 * sorted(forward_s)[int(0.99 * (len(forward_s) - 1))],
        # the loop adds the votes, the commits' copies and the checks
        "loop_ms_median": 1e3 * statistics.median(loop_s),
        "loop_ms_mean": 1e3 * statistics.fmean(loop_s),
    }
    if eplb is not None:
        eplb.stop()
        result.update(
            rebalances=eplb.rebalances,
            layers_committed=eplb.commits,
            checks_failed=eplb.checks_failed,
            vote_blocking_waits=eplb.vote.blocking_waits,
            staged_GBps_per_layer=(
                eplb.staged_bytes / sum(eplb.staged_s) / 1e9 if eplb.staged_s else 0.0
            ),
        )
    return result


def merge_ranks(views: list[dict]) -> dict:
    """The slowest rank's step times; checks of every rank."""
    merged = dict(max(views, key=lambda v: v["forward_ms_mean"]))
    if "checks_failed" in merged:
        merged["checks_failed"] = [
            f"rank {r}: {c}" for r, v in enumerate(views) for c in v["checks_failed"]
        ]
        merged["bit_exact"] = not merged["checks_failed"]
        merged["rebalances"] = min(v["rebalances"] for v in views)
        merged["vote_blocking_waits"] = max(v["vote_blocking_waits"] for v in views)
    return merged


def run_safety(ctx: Ctx, transports: list[str]) -> dict:
    runs: dict[str, dict] = {}
    # baseline before and after: its spread bounds the noise of the comparison
    for name in [BASELINE, *transports, BASELINE]:
        key = f"{name}_after" if name in runs else name
        runs[key] = merge_ranks(ctx.gather(run_forward(ctx, name)))
        if ctx.is_cuda:
            torch.cuda.empty_cache()
        if ctx.rank == 0:
            print(f"safety {key}: {json.dumps(runs[key])}", flush=True)
    base = [runs[BASELINE], runs[f"{BASELINE}_after"]]
    for stat in ("median", "mean", "loop_mean"):
        key = "loop_ms_mean" if stat == "loop_mean" else f"forward_ms_{stat}"
        b = statistics.fmean(r[key] for r in base)
        for name in transports:
            runs[name][f"slowdown_pct_{stat}"] = 100 * (runs[name][key] / b - 1)
    runs["baseline_spread_pct"] = 100 * abs(
        base[0]["forward_ms_median"] / base[1]["forward_ms_median"] - 1
    )
    return runs


# ---- report --------------------------------------------------------------


def print_table(report: dict) -> None:
    print(
        f"\n{report['world']} x {report['device_name']}  torch {report['torch']}  "
        f"layer {report['layer_bytes'] / 1e6:.1f} MB"
    )
    for pair in report.get("transfer", {}).get("pairs", []):
        f = pair["floor"]
        line = (
            f"{pair['src']}->{pair['dst']}  floor (one send) {f['device_GBps']:.1f} "
            f"GB/s device, {f['host_GBps']:.1f} host"
        )
        for name, r in pair.items():
            if isinstance(r, dict) and name != "floor":
                line += (
                    f" | {name} {r['device_GBps']:.1f} GB/s = "
                    f"{100 * r['device_vs_floor']:.0f}% (host "
                    f"{100 * r['host_vs_floor']:.0f}%) exact {r['bit_exact']}"
                )
        print(line)
    safety = report.get("safety")
    if safety:
        print(
            "run            steps  rebal  fwd ms med  mean    p99   "
            "slowdown fwd med / fwd mean / loop mean  exact"
        )
        for name, r in safety.items():
            if not isinstance(r, dict):
                continue
            slow = (
                " ".join(
                    f"{r[f'slowdown_pct_{k}']:+7.2f}%"
                    for k in ("median", "mean", "loop_mean")
                )
                if "slowdown_pct_median" in r
                else " " * 26
            )
            print(
                f"{name:14s} {r['steps']:5d}  {r.get('rebalances', 0):5d}  "
                f"{r['forward_ms_median']:9.3f} {r['forward_ms_mean']:7.3f} "
                f"{r['forward_ms_p99']:7.3f}   {slow}   {r.get('bit_exact', '-')}"
            )
        print(f"baseline spread {safety['baseline_spread_pct']:.2f}%")
    print("errors:", report["errors"] or "none")


def main() -> int:
    args = parse_args()
    if "RANK" not in os.environ:
        n = args.num_ranks or (
            torch.cuda.device_count() if args.device == "cuda" else 2
        )
        if n < 2:
            raise ValueError(f"needs at least 2 ranks, got {n} ({args.device})")
        return relaunch_under_torchrun(__file__, n)
    default = "p2p,ipc" if args.device == "cuda" else "p2p,gloo-staged"
    transports = (args.transports or default).split(",")
    allowed = {"p2p", "gloo-staged"} | (
        {"ipc", CROSS_NODE} if args.device == "cuda" else set()
    )
    if args.layout != "flat" and "safety" in args.only.split(","):
        raise ValueError("--layout applies to the transfer part only (--only transfer)")
    if any(t.endswith(ROWS) for t in transports) and "safety" in args.only.split(","):
        raise ValueError(f"'*{ROWS}' transports apply to the transfer part only")
    args.expert_bytes = layout_bytes(args.layout, args.expert_bytes)
    bad = [t for t in transports if t.removesuffix(ROWS) not in allowed]
    if bad:
        raise ValueError(f"transport(s) {bad} not available on {args.device}")
    ctx = Ctx(args)
    only = set(args.only.split(","))
    report: dict = {
        "world": ctx.world,
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.is_cuda else "cpu",
        "torch": torch.__version__,
        "layer_bytes": args.expert_bytes * args.experts_per_rank,
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": {
            k: os.environ[k]
            for k in (
                "NCCL_NVLS_ENABLE",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                "NVSHMEM_DISABLE_NVLS",
            )
        },
        "errors": [],
    }
    if "transfer" in only:
        report["transfer"] = run_transfer(ctx, transports)
        if ctx.rank == 0:
            print("transfer", json.dumps(report["transfer"]), flush=True)
    if "safety" in only:
        report["safety"] = run_safety(ctx, transports)
    for pair in report.get("transfer", {}).get("pairs", []):
        for name, r in pair.items():
            if isinstance(r, dict) and not r.get("bit_exact", True):
                report["errors"].append(f"transfer {pair['src']}->{pair['dst']} {name}")
    for name, r in report.get("safety", {}).items():
        if isinstance(r, dict) and r.get("checks_failed"):
            report["errors"].append(f"safety {name}: {r['checks_failed'][:5]}")
    ctx.watchdog.beat("end")
    ctx.barrier()
    if ctx.rank == 0:
        print_table(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    dist.destroy_process_group()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # peers blocked in a collective are ended by torchrun
