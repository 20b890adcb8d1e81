"""The failure paths of issue 12, each pinned by a test (one process).

1. a vote that times out is given up once: no later step waits on it again;
2. a planner that never finishes is abandoned past the timeout, with a log;
3. a transport counts the receives it abandoned, NCCL/HCCL works included;
4. shutdown joins this ``EplbState``'s threads only, not every
   ``async-eplb-*`` thread of the process;
5. the planner works on its own CPU copy of the placement, so a commit on the
   main thread while it plans cannot change its input.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from fake_works import FakeWork, until

from vllm.distributed.async_eplb.transports import TransferError, Transport


class WaitOnly(Transport):
    """A transport whose only job here is to wait for given works."""

    name = "wait-only"

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def stage_layer(self, *args, **kwargs) -> int:  # pragma: no cover
        raise NotImplementedError


@pytest.mark.parametrize(
    ("pollable", "cause"),
    [(True, "abort"), (True, "timeout"), (False, "abort")],
    ids=["nccl-like-abort", "nccl-like-timeout", "gloo-abort"],
)
def test_transport_counts_the_receives_it_gave_up_on(pollable: bool, cause: str):
    """(A gloo wait that times out has ended: gloo closed the pairs.)"""
    transport = WaitOnly(timeout=0.2 if cause == "timeout" else 30.0)
    if cause == "abort":
        transport.set_abort_check(lambda: True)
    late, done = FakeWork(), FakeWork()
    done.done.set()
    with pytest.raises(TransferError):
        transport._wait([done, late], [[1], [5]], pollable=pollable)
    # The late receive is still posted: it can land in the staging rows.
    assert transport.in_flight() == 1
    late.done.set()
    until(lambda: transport.in_flight() == 0)
    assert transport.helper_threads() == []


def test_a_transport_does_not_count_another_transports_receives() -> None:
    mine, other = WaitOnly(timeout=30.0), WaitOnly(timeout=30.0)
    other.set_abort_check(lambda: True)
    late = FakeWork()
    with pytest.raises(TransferError):
        other._wait([late], [[3]], pollable=False)
    assert (mine.in_flight(), other.in_flight()) == (0, 1)
    late.done.set()
    until(lambda: other.in_flight() == 0)


# -- EplbState on one in-process gloo rank ---------------------------------------

LAYERS, EXPERTS, REDUNDANT = 2, 8, 2
TIMEOUT_S = 0.5


class Records(logging.Handler):
    """ERROR and WARNING records of the package (vLLM's logger may not
    propagate to pytest's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


@pytest.fixture
def records():
    handler = Records()
    package = logging.getLogger("vllm.distributed.async_eplb")
    package.addHandler(handler)
    yield handler
    package.removeHandler(handler)


@pytest.fixture
def state(one_rank_world):
    state = _one_rank_state(step_interval=4)
    yield state
    state.shutdown(timeout=1.0)


def _one_rank_state(step_interval: int):
    from fake_vllm import model_config, parallel_config

    from vllm.distributed.async_eplb.config import AsyncEplbConfig
    from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
    from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

    state = EplbState(
        parallel_config(num_redundant_experts=REDUNDANT, step_interval=step_interval),
        "cpu",
        ep_group=EpGroupInfo.whole_world(),
        config=AsyncEplbConfig(min_gain=0.0, vote_delay=1, timeout_s=TIMEOUT_S),
    )
    model = ToyMoE(LAYERS, EXPERTS, REDUNDANT, 1, 0, hidden_size=4)
    state.add_model(model, model_config())
    state.step(is_dummy=True, is_profile=True)  # compiles the policy, as vLLM's
    state.start_async_loop()
    return state


def _step(state, pause: float = 0.0) -> float:
    """One engine step with skewed load; its seconds."""
    load = state.model_states["toy-hash"].expert_load_pass
    load[:, 0] += 9
    load[:, 1] += 1
    start = time.perf_counter()
    state.step()
    if pause:
        time.sleep(pause)
    return time.perf_counter() - start


class StuckGroup:
    """A process group of two ranks whose all-reduces never complete."""

    def allreduce(self, tensors, opts=None) -> FakeWork:
        return FakeWork()


def test_a_vote_that_times_out_turns_balancing_off_once_and_never_waits_again(
    state, records, monkeypatch
) -> None:
    from vllm.distributed.async_eplb import agreement

    monkeypatch.setattr(agreement.dist, "get_world_size", lambda group=None: 2)
    state._parts.vote = agreement.NonBlockingVote(StuckGroup(), 1, TIMEOUT_S)
    seconds = [_step(state) for _ in range(24)]  # six intervals
    waited = [s for s in seconds if s > TIMEOUT_S / 2]
    assert len(waited) == 1, seconds  # the timed-out vote, once
    c = state.counters
    assert not c.balancing_enabled and "vote" in c.disabled_cause
    assert c.rebalances == 0 and c.layers_committed == 0
    off = [t for t in records.texts if "rebalancing is OFF from step" in t]
    assert len(off) == 1, records.texts


def test_a_planner_that_never_finishes_is_abandoned_with_a_log(
    state, records, monkeypatch
) -> None:
    from vllm.distributed.async_eplb import rebalance_plan

    release = threading.Event()
    original = rebalance_plan.rebalance_experts

    def never_finishes(*args, **kwargs):
        release.wait(30)
        raise RuntimeError("released by the test")

    monkeypatch.setattr(rebalance_plan, "rebalance_experts", never_finishes)
    try:
        c = state.counters
        start = time.monotonic()
        while c.aborts == 0 and time.monotonic() - start < 10 * TIMEOUT_S:
            _step(state, pause=0.02)
        assert c.aborts == 1, "the stalled planner was never given up"
        assert time.monotonic() - start < 4 * TIMEOUT_S + 2.0
        assert "placement not finished" in c.last_abort_cause, c.last_abort_cause
        assert any("placement not finished" in t for t in records.texts)
        # The next round plans on a fresh thread, not behind the stuck one.
        monkeypatch.setattr(rebalance_plan, "rebalance_experts", original)
        for _ in range(40):
            _step(state, pause=0.01)
            if c.rebalances + c.skips:
                break
        assert c.rebalances + c.skips >= 1 and c.aborts == 1, c.last_abort_cause
    finally:
        release.set()


def test_shutdown_joins_only_its_own_threads(state, records) -> None:
    release = threading.Event()
    foreign = threading.Thread(
        target=release.wait, args=(30,), name="async-eplb-staging-other", daemon=True
    )
    foreign.start()
    try:
        start = time.perf_counter()
        state.shutdown(timeout=1.0)
        assert time.perf_counter() - start < 0.8
        assert not any("async-eplb-staging-other" in t for t in records.texts)
    finally:
        release.set()


def test_the_planner_plans_from_its_own_copy_of_the_placement(
    state, monkeypatch
) -> None:
    from vllm.distributed.async_eplb import rebalance_plan

    entered, mutated = threading.Event(), threading.Event()
    seen: list[torch.Tensor] = []
    original = rebalance_plan.rebalance_experts

    def planner_sees(weight, replicas, groups, nodes, ranks, old, **kw):
        entered.set()
        mutated.wait(10)  # the main thread commits a layer meanwhile
        seen.append(old.clone())
        return original(weight, replicas, groups, nodes, ranks, old, **kw)

    monkeypatch.setattr(rebalance_plan, "rebalance_experts", planner_sees)
    phy2log = state.model_states["toy-hash"].maps.phy2log
    before = phy2log.clone()
    while not entered.is_set():
        _step(state, pause=0.005)
    try:
        phy2log[0, [0, 1]] = phy2log[0, [1, 0]]  # stands for a commit
    finally:
        mutated.set()
    for _ in range(5):
        _step(state, pause=0.02)
    phy2log.copy_(before)
    assert seen and torch.equal(seen[0], before), "the planner read live maps"


def test_a_timed_out_vote_fails_once_then_never_waits(monkeypatch) -> None:
    from vllm.distributed.async_eplb import agreement

    monkeypatch.setattr(agreement.dist, "get_world_size", lambda group=None: 2)
    vote = agreement.NonBlockingVote(StuckGroup(), 1, TIMEOUT_S)
    vote.launch(0, "ready", [1])
    vote.launch(0, "log", [2])
    with pytest.raises(agreement.VoteTimeout, match="still incomplete"):
        vote.collect(1)
    assert vote.failed and "ready vote launched at step 0" in vote.failed
    start = time.perf_counter()
    vote.launch(2, "recover", [1])  # does nothing: the group is stuck
    assert vote.collect(3) == [] and vote.num_pending == 0
    assert not vote.may_launch(4, "ready")
    vote.drain()
    assert time.perf_counter() - start < TIMEOUT_S / 2


def test_a_round_never_begins_in_the_step_that_ended_the_last(state) -> None:
    """Rounds last longer than the interval here (4 steps), so they run back
    to back: the next one begins a step after the last one's end, never in
    the same step (its window sum would land on the step of the last commit)."""
    c, rnd = state.counters, state._round
    ended_steps, begun_steps = [], []
    for step in range(120):
        ended, epoch = c.rebalances + c.skips + c.aborts, rnd.epoch
        _step(state, pause=0.01)
        if c.rebalances + c.skips + c.aborts > ended:
            ended_steps.append(step)
        if rnd.epoch > epoch:
            begun_steps.append(step)
        if len(ended_steps) >= 3:
            break
    assert len(ended_steps) >= 3 and c.rebalances >= 1, (ended_steps, c.aborts)
    assert not set(ended_steps) & set(begun_steps), (ended_steps, begun_steps)
    # back to back: each later round begins the step after the previous end
    assert all(step + 1 in begun_steps for step in ended_steps[:-1])


def test_the_step_wakes_planner_and_staging_before_its_gate_opens(
    state, monkeypatch
) -> None:
    """Woken with the gate closed, both threads park until the step is over
    (woken after it opened, a planner took the GIL from the step's end)."""
    seen = []
    driver, fleet, gate = state._driver, state._fleet, state._gate
    monkeypatch.setattr(
        driver, "start_planning", lambda: seen.append(("plan", gate.is_open))
    )
    monkeypatch.setattr(fleet, "wake", lambda: seen.append(("wake", gate.is_open)))
    _step(state)
    assert seen == [("plan", False), ("wake", False)]
    assert gate.is_open


def test_no_ready_vote_is_launched_in_the_step_that_read_the_load_vote(
    state, monkeypatch
) -> None:
    """Its plan starts only after that step: the vote could not say
    "planned", and the step already reads a vote and makes the request."""
    from vllm.distributed.async_eplb.rebalance_round import RoundState

    vote, rnd = state._parts.vote, state._round
    launched: list[tuple[int, str]] = []
    real_launch = vote.launch

    def launch(step, kind, *args, **kwargs):
        launched.append((step, kind))
        return real_launch(step, kind, *args, **kwargs)

    monkeypatch.setattr(vote, "launch", launch)
    read_steps = []
    for _ in range(60):
        before = rnd.state
        _step(state, pause=0.005)
        if before is RoundState.AGGREGATING and rnd.state is not before:
            read_steps.append(state._driver._clock())
    ready_steps = {step for step, kind in launched if kind == "ready"}
    assert len(read_steps) >= 3 and ready_steps, (read_steps, launched)
    assert not ready_steps & set(read_steps), (read_steps, sorted(ready_steps))
    assert state.counters.rebalances + state.counters.skips >= 2


def test_the_step_before_a_rebalance_prefolds_the_window(
    one_rank_world, monkeypatch
) -> None:
    """The window is summed in the step before a rebalance's (but for the step
    that one records), so the rebalance's step folds a single step; never in
    a step that ended a round (it has a commit already)."""
    from vllm.distributed.async_eplb.load_stats import LoadWindow

    state = _one_rank_state(step_interval=24)
    calls: list[tuple[str, int, bool]] = []  # (what, step, prefold used)
    prefold, total = LoadWindow.prefold, LoadWindow.total

    def spy_prefold(window: LoadWindow) -> None:
        calls.append(("prefold", state.step_count, False))
        prefold(window)

    def spy_total(window: LoadWindow):
        pre = window._prefolded
        used = pre is not None and pre[0] + 1 == window.num_recorded
        calls.append(("total", state.step_count, used))
        return total(window)

    monkeypatch.setattr(LoadWindow, "prefold", spy_prefold)
    monkeypatch.setattr(LoadWindow, "total", spy_total)
    c = state.counters
    ended_steps = []
    try:
        for _ in range(80):
            ended = c.rebalances + c.skips + c.aborts
            _step(state, pause=0.01)
            if c.rebalances + c.skips + c.aborts > ended:
                ended_steps.append(state.step_count)
    finally:
        state.shutdown(timeout=1.0)
    totals = [(step, used) for what, step, used in calls if what == "total"]
    prefolds = [step for what, step, _ in calls if what == "prefold"]
    assert len(totals) >= 3 and c.rebalances >= 1, (calls, ended_steps)
    assert all(used for _, used in totals), totals
    assert prefolds == [step - 1 for step, _ in totals], (prefolds, totals)
    assert not set(prefolds) & set(ended_steps)
