"""StagingWorker in one process: several simulated ranks, one thread each.

The test transport reads peers' workspace weights directly (one-sided, as
``ipc`` does), so job flow, commits, cancel, errors and stop are exercised
without a process group; the torchrun tests cover the real transports.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.maps import ExpertMaps, derive_logical_maps
from vllm.distributed.async_eplb.planner import LayerPlan, plan_layers
from vllm.distributed.async_eplb.staging import StagingBuffer
from vllm.distributed.async_eplb.transports import (
    TransferError,
    Transport,
    copy_duplicates,
    copy_local,
    make_transport,
    resolve_transport,
    staging_backend,
)
from vllm.distributed.async_eplb.worker import (
    StagingError,
    StagingThread,
    StagingWorker,
    by_dtype,
    copy_rows,
)

CPU = DeviceBackend.for_device("cpu")
NUM_LAYERS, NUM_RANKS, SLOTS, NUM_EXPERTS = 4, 3, 4, 9


def expert_rows(layer: int, expert: int) -> list[torch.Tensor]:
    """Deterministic weights of one logical expert (fp32, bf16, uint8)."""
    base = float(layer * 1000 + expert)
    return [
        torch.full((2, 3), base) + torch.arange(6.0).view(2, 3) / 8,
        (torch.arange(5.0) + base).to(torch.bfloat16),
        torch.full((4,), (layer * 31 + expert) % 251, dtype=torch.uint8),
    ]


def rank_weights(row: Sequence[Sequence[int]], rank: int) -> list[list[torch.Tensor]]:
    out = []
    for layer, phy in enumerate(row):
        slots = phy[rank * SLOTS : (rank + 1) * SLOTS]
        per_slot = [expert_rows(layer, e) for e in slots]
        out.append([torch.stack([s[t] for s in per_slot]) for t in range(3)])
    return out


def placement(rng: random.Random) -> list[int]:
    row = list(range(NUM_EXPERTS))
    row += [rng.randrange(NUM_EXPERTS) for _ in range(NUM_RANKS * SLOTS - NUM_EXPERTS)]
    rng.shuffle(row)
    return row


class SharedMemoryTransport(Transport):
    """Pulls receives straight from the peers' workspace (test stand-in)."""

    name = "test-shared"

    def __init__(self, world, fail_layer, block: threading.Event) -> None:
        self.world = world
        self.fail_layer = fail_layer
        self.block = block

    def stage_layer(self, plan, rank, weights, buffers, *, packed=None) -> int:
        layer = next(
            i
            for i, w in enumerate(self.world[rank])
            if w[0].data_ptr() == weights[0].data_ptr()
        )
        if layer == self.fail_layer:
            raise TransferError("simulated peer failure", peers=[2])
        while self.block.is_set():
            if self.should_abort():
                raise TransferError("aborted", peers=[1])
            time.sleep(0.001)
        rank_plan = plan.ranks[rank]
        copy_local(rank_plan, weights, buffers)
        for t in rank_plan.receives:
            for dst, src in zip(buffers, self.world[t.src_rank][layer], strict=True):
                dst[t.dst_slots[0]].copy_(src[t.src_slot])
        copy_duplicates(rank_plan, buffers, None)
        return len(rank_plan.receives)


class World:
    def __init__(self, seed: int, ring_size: int = 1, fail_layer=None) -> None:
        rng = random.Random(seed)
        self.old = [placement(rng) for _ in range(NUM_LAYERS)]
        self.new = [placement(rng) for _ in range(NUM_LAYERS)]
        self.weights = [rank_weights(self.old, r) for r in range(NUM_RANKS)]
        self.block = threading.Event()
        self.prepared = False
        self.maps = [
            ExpertMaps(torch.tensor(self.old), NUM_EXPERTS, NUM_RANKS * SLOTS)
            for _ in range(NUM_RANKS)
        ]
        self.workers = [
            StagingWorker(
                self.weights[r],
                StagingBuffer(self.weights[r][0], CPU, ring_size=ring_size),
                SharedMemoryTransport(self.weights, fail_layer, self.block),
                CPU,
                rank=r,
            )
            for r in range(NUM_RANKS)
        ]
        for w in self.workers:
            w.start()
        self.plans = plan_layers(
            torch.tensor(self.old), torch.tensor(self.new), NUM_RANKS, 2
        )

    def submit(
        self, layers: Sequence[int], job_id: int = 1, prepare_maps: bool = False
    ) -> None:
        self.prepared = prepare_maps
        for r, w in enumerate(self.workers):
            extra = {}
            if prepare_maps:
                rows = {layer: torch.tensor(self.new[layer]) for layer in layers}
                extra = {"maps": self.maps[r], "new_rows": rows}
            w.submit(job_id, {layer: self.plans[layer] for layer in layers}, **extra)

    def wait_staged(self, layer: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(layer in w.staged_layers() for w in self.workers):
            assert time.monotonic() < deadline, f"layer {layer} never staged"
            for w in self.workers:
                assert w.error is None, w.error
            time.sleep(0.002)

    def commit(self, layer: int) -> None:
        for r, w in enumerate(self.workers):
            row = None if self.prepared else torch.tensor(self.new[layer])
            w.commit_layer(layer, self.maps[r], row)

    def assert_layer(self, layer: int, row: Sequence[int]) -> None:
        for r in range(NUM_RANKS):
            for s in range(SLOTS):
                want = expert_rows(layer, row[r * SLOTS + s])
                for t in range(3):
                    got = self.weights[r][layer][t][s]
                    assert torch.equal(got.view(torch.uint8), want[t].view(torch.uint8))
            assert self.maps[r].phy2log[layer].tolist() == list(row)
            log2phy, logcnt = derive_logical_maps(
                torch.tensor(row), NUM_EXPERTS, self.maps[r].max_replicas
            )
            assert torch.equal(self.maps[r].log2phy[layer], log2phy)
            assert torch.equal(self.maps[r].logcnt[layer], logcnt)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
            assert not w.is_alive()


@pytest.mark.parametrize(
    ("ring_size", "prepare_maps"), [(1, False), (2, False), (1, True)]
)
def test_whole_job_is_bit_exact(ring_size: int, prepare_maps: bool) -> None:
    world = World(seed=ring_size, ring_size=ring_size)
    try:
        world.submit(range(NUM_LAYERS), prepare_maps=prepare_maps)
        assert all(w.busy for w in world.workers)
        for layer in range(NUM_LAYERS):
            world.wait_staged(layer)
            world.commit(layer)
        for layer in range(NUM_LAYERS):
            world.assert_layer(layer, world.new[layer])
        assert not any(w.busy for w in world.workers)
        stats = world.workers[0].stats
        assert stats.job_id == 1 and sorted(stats.layer_seconds) == list(range(4))
    finally:
        world.stop()


class RecordingTransport(Transport):
    """Records each staged layer and how many stagings overlap (no bytes)."""

    name = "test-recording"
    lock = threading.Lock()

    def __init__(self, model: str, log: list, overlap: list[int]) -> None:
        self.model, self.log, self.overlap = model, log, overlap
        self.tag_space = -1

    def prepare_job(self, job_id: int) -> None:
        self.tag_space = job_id

    def stage_layer(self, plan, rank, weights, buffers, *, packed=None) -> int:
        with self.lock:
            self.overlap[0] += 1
            self.overlap[1] = max(self.overlap[1], self.overlap[0])
            self.log.append((self.model, self.tag_space))
        time.sleep(0.02)  # room for another thread to overlap, were there one
        with self.lock:
            self.overlap[0] -= 1
        return 0


def test_models_sharing_a_thread_stage_one_at_a_time_in_submission_order() -> None:
    """A target and a drafter on one ``EplbState`` share one staging thread:
    their transfers never overlap (they would mix messages on the staging
    group), run in the order submitted, and each job has its own tag space."""
    rng = random.Random(3)
    old, new = [placement(rng) for _ in range(2)], [placement(rng) for _ in range(2)]
    plans = plan_layers(torch.tensor(old), torch.tensor(new), NUM_RANKS, 2)
    thread = StagingThread(CPU, rank=0)
    log: list[tuple[str, int]] = []
    overlap = [0, 0]  # staging now, most at once
    workers = {}
    for model in ("target", "drafter"):
        weights = rank_weights(old, 0)
        workers[model] = StagingWorker(
            weights,
            StagingBuffer(weights[0], CPU, ring_size=2),
            RecordingTransport(model, log, overlap),
            CPU,
            rank=0,
            thread=thread,
        )
        workers[model].start()
    try:
        for model in ("target", "drafter"):
            workers[model].submit(1, {0: plans[0], 1: plans[1]})
        deadline = time.monotonic() + 10
        while any(len(w.staged_layers()) < 2 for w in workers.values()):
            assert time.monotonic() < deadline, log
            time.sleep(0.005)
        assert overlap[1] == 1
        assert log == [("target", 0), ("target", 0), ("drafter", 1), ("drafter", 1)]
    finally:
        workers["target"].stop()
    assert not workers["drafter"].is_alive()  # one thread: stopping it stops both


def test_cancel_keeps_committed_and_leaves_the_rest_untouched() -> None:
    world = World(seed=5)
    try:
        world.submit(range(NUM_LAYERS))
        world.wait_staged(0)
        world.commit(0)
        world.wait_staged(1)  # staged, never committed
        for w in world.workers:
            w.cancel()
            assert not w.busy and w.staged_layers() == []
        world.assert_layer(0, world.new[0])
        for layer in range(1, NUM_LAYERS):
            world.assert_layer(layer, world.old[layer])
        # A new job for the remaining layers runs to completion.
        world.submit([2, 3], job_id=2)
        for layer in (2, 3):
            world.wait_staged(layer)
            world.commit(layer)
        world.assert_layer(1, world.old[1])
        world.assert_layer(3, world.new[3])
    finally:
        world.stop()


def test_error_carries_layer_and_peer_and_is_handed_over() -> None:
    world = World(seed=9, fail_layer=1)
    try:
        world.submit(range(NUM_LAYERS))
        world.wait_staged(0)
        world.commit(0)
        deadline = time.monotonic() + 10
        while world.workers[0].error is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        error = world.workers[0].error
        assert isinstance(error, StagingError)
        assert error.layer == 1 and error.peers == (2,)
        assert "layer 1" in str(error) and "[2]" in str(error)
        assert isinstance(error.__cause__, TransferError)
        assert not world.workers[0].busy and world.workers[0].is_alive()
        world.assert_layer(1, world.old[1])
    finally:
        world.stop()


def test_idle_is_false_while_a_cancelled_layer_still_waits_on_peers() -> None:
    world = World(seed=6)
    try:
        assert all(w.idle for w in world.workers)
        world.block.set()
        world.submit([0])
        deadline = time.monotonic() + 10
        while any(w.idle for w in world.workers):
            assert time.monotonic() < deadline, "worker never entered the layer"
            time.sleep(0.002)
        for w in world.workers:
            w.cancel()
            assert not w.busy and not w.idle  # dropped, but still inside layer 0
        world.block.clear()
        while not all(w.idle for w in world.workers):
            assert time.monotonic() < deadline, "worker never left the layer"
            time.sleep(0.002)
    finally:
        world.stop()


def test_stop_is_prompt_while_waiting_on_peers() -> None:
    world = World(seed=3)
    world.block.set()
    world.submit([0])
    time.sleep(0.05)
    start = time.monotonic()
    world.stop()  # asserts the threads are gone
    assert time.monotonic() - start < 5.0


def test_bad_calls_raise_and_change_nothing() -> None:
    world = World(seed=4)
    try:
        w = world.workers[0]
        with pytest.raises(RuntimeError, match="layer 0 is not staged"):
            w.commit_layer(0, world.maps[0], torch.tensor(world.new[0]))
        with pytest.raises(ValueError, match="layer 7 is out of range"):
            w.submit(1, {7: world.plans[0]})
        other = LayerPlan(1, SLOTS * NUM_RANKS, world.plans[0].ranks[:1])
        with pytest.raises(ValueError, match="rank 0 with 4 slots"):
            w.submit(1, {0: other})
        world.submit([0])
        with pytest.raises(RuntimeError, match="job 1 is still in flight"):
            w.submit(2, {1: world.plans[1]})
        world.wait_staged(0)
        bad_row = torch.full((NUM_RANKS * SLOTS,), NUM_EXPERTS)
        with pytest.raises(ValueError, match="is not a logical expert id"):
            w.commit_layer(0, world.maps[0], bad_row)
        world.assert_layer(0, world.old[0])
        assert w.staged_layers() == [0]
        world.commit(0)
        world.assert_layer(0, world.new[0])
    finally:
        world.stop()


def test_make_transport_rejects_bad_names_and_options() -> None:
    from vllm.distributed.async_eplb.transports import make_transport

    with pytest.raises(ValueError, match="unknown transport 'nccl'"):
        make_transport("nccl", backend=CPU, group=None)
    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
        make_transport("auto", backend=CPU, group=None, timeout=0)
    with pytest.raises(ValueError, match="'ipc' needs expert_weights"):
        make_transport("ipc", backend=CPU, group=None)


def test_worker_rejects_weights_that_do_not_fit_the_buffer() -> None:
    weights = rank_weights([list(range(NUM_RANKS * SLOTS))] * 2, 0)
    buffer = StagingBuffer(weights[0], CPU)
    weights[1][2] = weights[1][2][:, :3]
    with pytest.raises(ValueError, match="layer 1's expert weights do not match"):
        StagingWorker(
            weights, buffer, SharedMemoryTransport(None, None, None), CPU, rank=0
        )


def test_p2p_on_an_accelerator_stages_over_its_own_library() -> None:
    cuda, npu, cpu = "cuda", "npu", "cpu"
    assert staging_backend("p2p", cuda) == "nccl"
    assert staging_backend("p2p", npu) == "hccl"
    assert staging_backend("auto", npu) == "hccl"  # auto is p2p on NPU
    for name in ("auto", "ipc", "gloo-staged"):
        assert staging_backend(name, cuda) == "gloo"
    for name in ("auto", "p2p", "gloo-staged"):
        assert staging_backend(name, cpu) == "gloo"
    assert resolve_transport("auto", "cuda") == "ipc"
    with pytest.raises(ValueError, match="'nccl2'"):
        staging_backend("nccl2", cuda)


def test_p2p_refuses_a_gloo_group_for_device_tensors(monkeypatch) -> None:
    import vllm.distributed.async_eplb.transports as transports

    monkeypatch.setattr(transports.dist, "get_backend", lambda group: "gloo")
    with pytest.raises(ValueError, match="'p2p' on cuda:0 needs a nccl staging"):
        make_transport(
            "p2p", backend=DeviceBackend(torch.device("cuda", 0)), group=object()
        )


def test_status_is_one_immutable_snapshot_taken_under_the_lock() -> None:
    """The main thread reads a snapshot, never fields the thread writes."""
    world = World(seed=7)
    try:
        worker = world.workers[0]
        idle = worker.status()
        assert (idle.busy, idle.staged, idle.error, idle.death) == (
            False,
            (),
            None,
            None,
        )
        world.submit(range(2), job_id=5)
        world.wait_staged(0)
        status = worker.status()
        assert status.job_id == 5 and status.busy and status.staged == (0,)
        assert len(status.layer_seconds) == 1 and status.bytes_received >= 0
        with pytest.raises(AttributeError):
            status.staged = ()  # type: ignore[misc]
        world.commit(0)
        world.wait_staged(1)
        world.commit(1)  # the worker went on writing; the snapshot stays
        assert status.staged == (0,) and len(status.layer_seconds) == 1
        final = worker.status()
        assert final.staged == () and not final.busy
        assert len(final.layer_seconds) == 2
    finally:
        world.stop()


def test_commit_copies_are_grouped_by_dtype_one_call_each(monkeypatch) -> None:
    """A quantized layer's runs mix dtypes (weights, scales): each
    ``_foreach_copy_`` gets one dtype, so on a GPU each is one fused kernel
    (mixed, torch falls back to a copy per tensor)."""
    runs = [
        (torch.zeros(2, 3), torch.ones(2, 3)),
        (torch.zeros(4, dtype=torch.uint8), torch.full((4,), 7, dtype=torch.uint8)),
        (torch.zeros(1, 3), torch.full((1, 3), 2.0)),
        (torch.zeros(2, dtype=torch.uint8), torch.full((2,), 9, dtype=torch.uint8)),
    ]
    dst, src = by_dtype([d for d, _ in runs], [s for _, s in runs])
    dtypes = [[t.dtype for t in group] for group in dst]
    assert dtypes == [[torch.float32] * 2, [torch.uint8] * 2]
    assert dst[0][1] is runs[2][0] and src[1][1] is runs[3][1]  # order kept
    calls: list[set[torch.dtype]] = []
    original = torch._foreach_copy_

    def spy(dsts, srcs, **kwargs):
        calls.append({t.dtype for t in [*dsts, *srcs]})
        return original(dsts, srcs, **kwargs)

    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    copy_rows(dst, src)
    assert calls == [{torch.float32}, {torch.uint8}]
    for d, s in runs:
        assert torch.equal(d, s)
    assert by_dtype([], []) == ([], [])
