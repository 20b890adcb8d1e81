"""torchrun script: stage and commit random rebalances on every rank (gloo, CPU).

Each rank holds per-layer expert weights of several dtypes that are a pure
function of (layer, logical expert), so it can check bit-exactness alone.
The main thread stands in for the agreement: an all-reduce of "staged" flags,
then every rank commits the same layers.

Modes, run in order in one launch: ``full`` (two jobs back to back),
``cancel`` (cancel after one commit, then a new job), ``abort`` (2 ranks: rank
0 waits for a rank that is not there and gives up on its abort check well
before the transport timeout; the late peer then completes the layer),
``tags`` (2 ranks: rank 0's job 1 is aborted with its messages unmatched; job 2
must receive only job 2's bytes, then the stale job 1 messages are matched),
``fault`` (rank 1 fails on layer 1: the others must time out naming it; must
come last).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.maps import ExpertMaps
from vllm.distributed.async_eplb.planner import plan_layers
from vllm.distributed.async_eplb.staging import StagingBuffer
from vllm.distributed.async_eplb.transports import TransferError, make_transport
from vllm.distributed.async_eplb.worker import StagingError, StagingWorker


def expert_rows(layer: int, expert: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(layer * 100_003 + expert)
    return [
        torch.randn(3, 8, generator=gen),
        torch.randn(16, generator=gen).to(torch.bfloat16),
        torch.randint(0, 256, (24,), generator=gen, dtype=torch.uint8),  # FP8 view
    ]


def placement(rng: random.Random, experts: int, slots: int) -> list[int]:
    row = list(range(experts)) + [
        rng.randrange(experts) for _ in range(slots - experts)
    ]
    rng.shuffle(row)
    return row


def build_weights(rows, rank: int, spr: int) -> list[list[torch.Tensor]]:
    out = []
    for layer, row in enumerate(rows):
        per_slot = [expert_rows(layer, e) for e in row[rank * spr : (rank + 1) * spr]]
        out.append([torch.stack([s[t] for s in per_slot]) for t in range(3)])
    return out


def check(weights, rows, rank: int, spr: int, layers) -> None:
    for layer in layers:
        for slot in range(spr):
            want = expert_rows(layer, rows[layer][rank * spr + slot])
            for t, w in enumerate(weights[layer]):
                if not torch.equal(
                    w[slot].view(torch.uint8), want[t].view(torch.uint8)
                ):
                    raise AssertionError(
                        f"rank {rank} layer {layer} slot {slot} tensor {t} differs"
                    )


def run_job(worker, maps, plans, new_rows, world, cancel_after=None) -> list[int]:
    """Commit staged layers in agreement; returns the committed layers.

    One all-reduce (MIN) per poll carries every layer's "staged" flag and a
    last "no error" flag, so that all ranks stop together on any rank's error.
    """
    worker.submit(1, dict(enumerate(plans)))
    committed: list[int] = []
    num_layers = len(plans)
    deadline = time.monotonic() + 60
    while len(committed) < num_layers:
        flags = torch.zeros(num_layers + 1, dtype=torch.int32)
        for layer in worker.staged_layers():
            flags[layer] = 1
        flags[-1] = int(worker.error is None)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=world)
        if not flags[-1]:
            while worker.error is None:  # a peer failed: ours must fail too
                assert time.monotonic() < deadline, "no error seen on this rank"
                time.sleep(0.01)
            raise worker.error
        ready = [i for i in range(num_layers) if flags[i] and i not in committed]
        for layer in ready:
            worker.commit_layer(layer, maps, torch.tensor(new_rows[layer]))
            committed.append(layer)
            if cancel_after is not None and len(committed) == cancel_after:
                worker.cancel()
                return committed
        assert time.monotonic() < deadline, f"committed only {committed}"
        time.sleep(0.002)
    return committed


class Scenario:
    """One rank's weights, maps and worker for a random three-placement run."""

    def __init__(self, args, staging_group, mode: str) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.staging_group = staging_group
        self.spr = args.slots_per_rank
        self.rpn = args.ranks_per_node
        num_slots = self.world_size * self.spr
        self.experts = max(1, num_slots * 3 // 4)
        rng = random.Random(f"{args.seed}-{mode}")
        self.old, self.new, self.newer = (
            [placement(rng, self.experts, num_slots) for _ in range(args.layers)]
            for _ in range(3)
        )
        backend = DeviceBackend.for_device("cpu")
        self.weights = build_weights(self.old, self.rank, self.spr)
        self.maps = ExpertMaps(torch.tensor(self.old), self.experts, num_slots)
        transport = make_transport(
            args.transport,
            backend=backend,
            group=staging_group,
            timeout=3.0 if mode == "fault" else 60.0,
        )
        if mode == "fault" and self.rank == 1:
            transport.stage_layer = self._failing_on_layer_1(transport.stage_layer)
        self.transport = transport
        buffer = StagingBuffer(self.weights[0], backend, ring_size=args.ring)
        self.worker = StagingWorker(
            self.weights, buffer, transport, backend, rank=self.rank
        )
        self.worker.start()

    def _failing_on_layer_1(self, stage_layer):
        def failing(plan, rank, weights, buffers, *, packed=None):
            if weights[0].data_ptr() == self.weights[1][0].data_ptr():
                raise RuntimeError("injected failure")
            return stage_layer(plan, rank, weights, buffers, packed=packed)

        return failing

    def plans(self, old, new):
        return plan_layers(
            torch.tensor(old), torch.tensor(new), self.world_size, self.rpn
        )

    def check(self, rows, layers) -> None:
        check(self.weights, rows, self.rank, self.spr, layers)


def run_full(sc: Scenario, world) -> str:
    num_layers = len(sc.old)
    run_job(sc.worker, sc.maps, sc.plans(sc.old, sc.new), sc.new, world)
    sc.check(sc.new, range(num_layers))
    if sc.rank == 0:  # receive through scratch rows: the wire format must not care
        stage_layer = sc.transport.stage_layer

        def unpacked(plan, rank, weights, buffers, *, packed=None):
            return stage_layer(plan, rank, weights, buffers, packed=None)

        sc.transport.stage_layer = unpacked
    run_job(sc.worker, sc.maps, sc.plans(sc.new, sc.newer), sc.newer, world)
    sc.check(sc.newer, range(num_layers))
    assert sc.maps.phy2log.tolist() == sc.newer
    return f"bytes {sc.worker.stats.bytes_received}"


def run_cancel(sc: Scenario, world) -> str:
    num_layers = len(sc.old)
    plans = sc.plans(sc.old, sc.new)
    committed = run_job(sc.worker, sc.maps, plans, sc.new, world, cancel_after=1)
    assert committed == [0] and not sc.worker.busy
    sc.check(sc.new, [0])
    sc.check(sc.old, range(1, num_layers))
    # Layers drained after the cancel must not disturb the next job.
    current = [sc.new[0], *sc.old[1:]]
    run_job(sc.worker, sc.maps, sc.plans(current, sc.newer), sc.newer, world)
    sc.check(sc.newer, range(num_layers))
    return "cancelled and recovered"


def run_fault(sc: Scenario, world) -> str:
    try:
        run_job(sc.worker, sc.maps, sc.plans(sc.old, sc.new), sc.new, world)
    except StagingError as exc:
        assert exc.layer == 1, exc
        if sc.rank != 1:
            assert isinstance(exc.__cause__, TransferError), exc
            assert exc.peers, exc
        sc.check(sc.old, range(1, len(sc.old)))
        return f"fault seen: {exc}"
    raise AssertionError("the injected failure went unnoticed")


def _stage_layer0(sc: Scenario, transport, weights, buffer, job: int) -> None:
    transport.prepare_job(job)
    transport.stage_layer(
        sc.plans(sc.old, sc.new)[0],
        sc.rank,
        weights,
        buffer.slot(0),
        packed=buffer.packed(0),
    )


def _check_staged_layer0(sc: Scenario, buffer) -> None:
    plan = sc.plans(sc.old, sc.new)[0]
    for slot in plan.ranks[sc.rank].changed_slots:
        want = expert_rows(0, sc.new[0][sc.rank * sc.spr + slot])
        for t, staged in enumerate(buffer.slot(0)):
            got = staged[slot].view(torch.uint8)
            if not torch.equal(got, want[t].view(torch.uint8)):
                raise AssertionError(f"rank {sc.rank} staged slot {slot} tensor {t}")


def _fresh_transport(sc: Scenario, group, abort_after_s: float | None):
    backend = DeviceBackend.for_device("cpu")
    transport = make_transport("gloo-staged", backend=backend, group=group, timeout=60)
    if abort_after_s is not None:
        give_up = time.monotonic() + abort_after_s
        transport.set_abort_check(lambda: time.monotonic() > give_up)
    return transport, StagingBuffer(sc.weights[0], backend)


def run_abort(sc: Scenario, world) -> str:
    """The abort check ends a gloo wait long before the 60 s timeout."""
    assert sc.world_size == 2, "abort mode needs 2 ranks"
    abort_after = 0.5 if sc.rank == 0 else None
    transport, buffer = _fresh_transport(sc, sc.staging_group, abort_after)
    result = "completed late"
    if sc.rank == 0:
        start = time.monotonic()
        try:
            _stage_layer0(sc, transport, sc.weights[0], buffer, job=1)
            raise AssertionError("the wait did not notice the abort")
        except TransferError as exc:
            elapsed = time.monotonic() - start
            assert "aborted" in str(exc) and exc.peers == (1,), exc
            assert elapsed < 10, f"abort took {elapsed:.1f} s"
            # its receives are still posted: counted until they end
            assert transport.in_flight() == 1, transport.in_flight()
            result = f"aborted after {elapsed:.2f} s (timeout 60 s)"
    dist.barrier(group=world)  # rank 1 shows up only now
    if sc.rank == 1:  # rank 0's messages are still posted: the layer completes
        _stage_layer0(sc, transport, sc.weights[0], buffer, job=1)
        _check_staged_layer0(sc, buffer)
    dist.barrier(group=world)
    deadline = time.monotonic() + 10
    while transport.in_flight():
        assert time.monotonic() < deadline, "an abandoned wait never ended"
        time.sleep(0.01)
    return result


def run_tags(sc: Scenario, world) -> str:
    """A later job never receives an aborted job's unmatched messages."""
    assert sc.world_size == 2, "tags mode needs 2 ranks"
    abort_after = 0.3 if sc.rank == 0 else None
    transport, buffer = _fresh_transport(sc, sc.staging_group, abort_after)
    stale_weights = [torch.zeros_like(w) for w in sc.weights[0]]
    # Job 1's abandoned receives keep their own buffer: they may land at any time
    # (EplbState waits for them before the next job; this test must not).
    stale_buffer = StagingBuffer(sc.weights[0], DeviceBackend.for_device("cpu"))
    if sc.rank == 0:  # job 1: sends zeros, posts receives; rank 1 never comes
        try:
            _stage_layer0(sc, transport, stale_weights, stale_buffer, job=1)
            raise AssertionError("job 1 was not aborted")
        except TransferError:
            pass
        transport.set_abort_check(lambda: False)
    dist.barrier(group=world)
    _stage_layer0(sc, transport, sc.weights[0], buffer, job=2)
    _check_staged_layer0(sc, buffer)  # job 2's bytes, not job 1's zeros
    if sc.rank == 1:  # match job 1's stale messages, so every wait ends cleanly
        _stage_layer0(sc, transport, stale_weights, stale_buffer, job=1)
    dist.barrier(group=world)
    return "job 2 received only its own messages"


MODES = {
    "full": run_full,
    "cancel": run_cancel,
    "abort": run_abort,
    "tags": run_tags,
    "fault": run_fault,
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", default="gloo-staged")
    parser.add_argument("--ranks-per-node", type=int, default=1)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--slots-per-rank", type=int, default=4)
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument(
        "--modes", default="full,cancel", help="comma list of full, cancel, fault"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes) or "fault" in modes[:-1]:
        parser.error(f"bad --modes {args.modes!r}")

    dist.init_process_group("gloo")
    world = dist.group.WORLD
    staging_group = dist.new_group(backend="gloo")
    for mode in modes:
        sc = Scenario(args, staging_group, mode)
        try:
            result = MODES[mode](sc, world)
        finally:
            sc.worker.stop()
        print(f"OK rank {sc.rank} {mode}: {result}", flush=True)
    # Leave together: an early exit would break a peer's pending messages.
    dist.barrier(group=world)
    if modes[-1] != "fault":  # after a fault the staging group is broken
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
