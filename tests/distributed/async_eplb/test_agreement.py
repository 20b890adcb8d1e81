"""The non-blocking vote (2 gloo ranks) and the simulator's blocking-collective
counter, which the multi-rank tests use too."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torchrun_util import run_torchrun

from vllm.distributed.async_eplb.agreement import NonBlockingVote
from vllm.distributed.async_eplb.simulation.collectives import CollectiveCounter

SCRIPT = Path(__file__).parent / "multirank" / "eplb_state_vote.py"


def test_single_rank_vote_is_read_exactly_delay_steps_later() -> None:
    vote = NonBlockingVote(None, delay=2, timeout_s=1.0)
    vote.launch(5, "ready", torch.tensor([1, 2]), context="c")
    assert vote.collect(6) == []
    (result,) = vote.collect(7)
    assert (result.kind, result.launched_at, result.context) == ("ready", 5, "c")
    assert result.total.tolist() == [1, 2]
    assert vote.num_pending == 0 and vote.blocking_waits == 0


def test_votes_come_back_in_launch_order() -> None:
    vote = NonBlockingVote(None, delay=1, timeout_s=1.0)
    for step in range(3):
        vote.launch(step, f"k{step}", torch.tensor([step]))
    assert [r.kind for r in vote.collect(10)] == ["k0", "k1", "k2"]


@pytest.mark.parametrize(
    ("delay", "timeout", "gap", "match"),
    [(0, 1.0, 1, "delay"), (1, 0.0, 1, "timeout"), (1, 1.0, 0, "gap")],
)
def test_bad_arguments(delay: int, timeout: float, gap: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NonBlockingVote(None, delay=delay, timeout_s=timeout, launch_gap=gap)


def test_counter_counts_only_blocking_calls_of_its_thread() -> None:
    import torch.distributed as dist

    counter = CollectiveCounter()
    original = dist.all_reduce
    calls = []
    dist.all_reduce = lambda *a, **k: calls.append(k)  # no process group needed
    try:
        uninstall = counter.install()
        counter.armed = True
        dist.all_reduce(torch.zeros(1))
        dist.all_reduce(torch.zeros(1), async_op=True)
        other = threading.Thread(target=dist.all_reduce, args=(torch.zeros(1),))
        other.start()  # another thread's call: not counted
        other.join()
        counter.armed = False
        dist.all_reduce(torch.zeros(1))  # disarmed: not counted
        counter.armed = True
        uninstall()
        dist.all_reduce(torch.zeros(1))  # uninstalled: not counted
    finally:
        dist.all_reduce = original
    assert counter.take() == 1
    assert len(calls) == 5


@pytest.mark.multirank
def test_two_ranks_agree_and_time_out_together() -> None:
    proc = run_torchrun(SCRIPT, 2, timeout=120)
    assert proc.stdout.count("VOTE OK") == 2, proc.stdout[-2000:]


@pytest.mark.parametrize(
    ("gap", "expected"), [(1, [1, 4, 7, 10]), (3, [1, 6, 11]), (None, [1, 5, 9])]
)
def test_one_vote_of_a_kind_in_flight_next_launch_gap_steps_after_its_read(
    gap: int | None, expected: list[int]
) -> None:
    kwargs = {} if gap is None else {"launch_gap": gap}
    vote = NonBlockingVote(None, delay=2, timeout_s=1.0, **kwargs)
    launched = []
    for step in range(1, 12):
        vote.collect(step)
        if vote.may_launch(step, "ready"):
            vote.launch(step, "ready", [step])
            launched.append(step)
        if step == 4:
            vote.launch(step, "load", [0])  # other kinds do not hold it back
    # gap 1: launched at 1, read at 3, next at 4, read at 6, next at 7, ...
    assert launched == expected


def test_list_payload_is_its_own_total_on_one_rank() -> None:
    vote = NonBlockingVote(None, delay=1, timeout_s=1.0)
    vote.launch(0, "ready", [3, 0, 1])
    (result,) = vote.collect(1)
    assert result.total.dtype == torch.int64 and result.total.tolist() == [3, 0, 1]
