"""The staging thread holds off while the engine is inside its step (issue 13).

``EplbState.step()`` closes the gate; the staging thread passes it before each
piece of Python work, so it never takes the GIL from a step. Same in-process
world as ``test_worker.py``.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from test_worker import (
    CPU,
    NUM_EXPERTS,
    NUM_RANKS,
    SLOTS,
    SharedMemoryTransport,
    expert_rows,
    placement,
    rank_weights,
)

from vllm.distributed.async_eplb.maps import ExpertMaps, derive_logical_maps
from vllm.distributed.async_eplb.planner import plan_layers
from vllm.distributed.async_eplb.staging import StagingBuffer
from vllm.distributed.async_eplb.step_gate import StepGate
from vllm.distributed.async_eplb.worker import StagingThread, StagingWorker


def test_wait_returns_at_once_when_open_and_when_opened() -> None:
    gate = StepGate(max_wait_s=5.0)
    start = time.monotonic()
    gate.wait()
    assert time.monotonic() - start < 0.5
    gate.close()
    assert not gate.is_open
    threading.Timer(0.1, gate.open).start()
    start = time.monotonic()
    gate.wait()
    assert 0.05 < time.monotonic() - start < 4.0
    assert gate.is_open


def test_a_step_that_blocks_holds_the_threads_up_at_most_max_wait() -> None:
    gate = StepGate(max_wait_s=0.1)
    gate.close()
    start = time.monotonic()
    gate.wait()
    assert 0.05 < time.monotonic() - start < 2.0


def test_max_wait_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_wait_s must be > 0, got 0"):
        StepGate(max_wait_s=0)


def test_staging_waits_for_the_gate_then_stages_bit_exact() -> None:
    rng = random.Random(11)
    old, new = placement(rng), placement(rng)
    world = [rank_weights([old], r) for r in range(NUM_RANKS)]
    plan = plan_layers(torch.tensor([old]), torch.tensor([new]), NUM_RANKS, 3)[0]
    gate = StepGate(max_wait_s=30.0)
    thread = StagingThread(CPU, rank=0, gate=gate)
    transport = SharedMemoryTransport(world, None, threading.Event())
    worker = StagingWorker(
        world[0],
        StagingBuffer(world[0][0], CPU, ring_size=1),
        transport,
        CPU,
        rank=0,
        thread=thread,
    )
    maps = ExpertMaps(torch.tensor([old]), NUM_EXPERTS, NUM_RANKS * SLOTS)
    worker.start()
    try:
        gate.close()  # the engine is inside a step
        worker.submit(1, {0: plan}, maps=maps, new_rows={0: torch.tensor(new)})
        time.sleep(0.3)
        assert worker.staged_layers() == []
        gate.open()  # the step ended
        deadline = time.monotonic() + 10
        while worker.staged_layers() != [0]:
            assert time.monotonic() < deadline, worker.error
            time.sleep(0.005)
        worker.commit_layer(0, maps)  # the maps prepared while staging
        for s in range(SLOTS):
            want = expert_rows(0, new[s])
            for t in range(3):
                got = world[0][0][t][s].view(torch.uint8)
                assert torch.equal(got, want[t].view(torch.uint8))
        assert maps.phy2log[0].tolist() == new
        log2phy, logcnt = derive_logical_maps(
            torch.tensor(new), NUM_EXPERTS, maps.max_replicas
        )
        assert torch.equal(maps.log2phy[0], log2phy)
        assert torch.equal(maps.logcnt[0], logcnt)
    finally:
        worker.stop()
