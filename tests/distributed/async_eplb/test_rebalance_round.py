"""The rebalance round's state machine, without processes or threads.

Every path of a round and every failure edge the issue names: plan error,
plan timeout, staging error, staging stall, vote timeout, vote error, peer
abort, shutdown mid-round; and every transition not in the table refused.
"""

from __future__ import annotations

import pytest

from vllm.distributed.async_eplb.rebalance_round import (
    TRANSITIONS,
    RebalanceRound,
    RoundError,
    RoundState,
)

S = RoundState
TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rnd(clock: Clock) -> RebalanceRound:
    return RebalanceRound(TIMEOUT, clock)


def _to(rnd: RebalanceRound, state: RoundState) -> RebalanceRound:
    """Drive a fresh round to ``state`` along the normal path."""
    path = {
        S.IDLE: [],
        S.AGGREGATING: [rnd.begin],
        S.PLANNING: [rnd.begin, rnd.start_planning],
        S.PLANNED: [
            rnd.begin,
            rnd.start_planning,
            lambda: rnd.planned(["p"], skip=False),
        ],
        S.SKIPPING: [
            rnd.begin,
            rnd.start_planning,
            lambda: rnd.planned(["p"], skip=True),
        ],
        S.FAILED: [rnd.begin, rnd.start_planning, lambda: rnd.fail("x")],
        S.STAGING: [
            rnd.begin,
            rnd.start_planning,
            lambda: rnd.planned(["p"], skip=False),
            rnd.submitted,
        ],
        S.RECOVERING: [
            rnd.begin,
            rnd.start_planning,
            lambda: rnd.planned(["p"], skip=False),
            rnd.submitted,
            rnd.abort,
        ],
        S.OFF: [rnd.turn_off],
        S.SHUT_DOWN: [rnd.shut_down],
    }[state]
    for step in path:
        step()
    assert rnd.state is state
    return rnd


def test_a_round_that_commits(rnd: RebalanceRound) -> None:
    assert rnd.begin() == 1 and rnd.in_flight
    rnd.start_planning()
    rnd.planned(["plan"], skip=False)
    assert rnd.plans == ["plan"]
    rnd.submitted()
    rnd.finish()
    assert rnd.state is S.IDLE and rnd.plans == [] and not rnd.in_flight
    assert rnd.begin() == 2  # epochs count rounds


def test_the_round_keeps_each_models_pending_layers(rnd: RebalanceRound) -> None:
    _to(rnd, S.PLANNED)
    assert rnd.pending == [] and rnd.pending_layers(0) == []
    rnd.submitted([[1, 3], [], [0]])
    assert rnd.pending_layers(0) == [1, 3] and rnd.pending_layers(2) == [0]
    rnd.layer_committed(0, 3)
    assert rnd.pending == [[1], [], [0]]
    with pytest.raises(RoundError, match="layer 3 of model 0 is not pending"):
        rnd.layer_committed(0, 3)  # committed twice
    with pytest.raises(RoundError, match="layer 1 of model 1 is not pending"):
        rnd.layer_committed(1, 1)
    rnd.layer_committed(0, 1)
    rnd.layer_committed(2, 0)
    assert not any(rnd.pending)
    rnd.finish()
    assert rnd.pending == [] and rnd.pending_layers(0) == []


def test_an_abort_mid_staging_forgets_the_pending_layers(rnd) -> None:
    _to(rnd, S.PLANNED)
    rnd.submitted([[0, 1]])
    rnd.fail("staging worker failed")
    assert rnd.abort() and rnd.state is S.RECOVERING and rnd.pending == []
    with pytest.raises(RoundError, match="not pending"):
        rnd.layer_committed(0, 0)


def test_every_rank_skips(rnd: RebalanceRound) -> None:
    _to(rnd, S.SKIPPING).finish()
    assert rnd.state is S.IDLE


def test_plan_error_fails_the_round_and_the_vote_aborts_it(rnd) -> None:
    _to(rnd, S.PLANNING)
    err = ValueError("NaN load")
    rnd.fail("placement failed", err)
    assert rnd.state is S.FAILED
    assert (rnd.local_error, rnd.local_exc) == ("placement failed", err)
    assert rnd.abort() is False  # nothing was staged: no recovery
    assert rnd.state is S.IDLE and rnd.local_error is None


def test_plan_timeout_is_seen_only_past_the_deadline(rnd, clock) -> None:
    _to(rnd, S.PLANNING)
    clock.now += TIMEOUT
    assert not rnd.plan_overdue()
    clock.now += 0.1
    assert rnd.plan_overdue()
    rnd.fail("placement not finished")
    assert rnd.state is S.FAILED and not rnd.plan_overdue()


def test_staging_error_keeps_staging_and_the_abort_recovers(rnd) -> None:
    _to(rnd, S.STAGING)
    rnd.fail("staging layer 1 failed")
    rnd.fail("a later cause")  # the first is kept
    assert rnd.state is S.STAGING and rnd.local_error == "staging layer 1 failed"
    assert rnd.abort() is True
    assert rnd.state is S.RECOVERING
    rnd.recovered()
    assert rnd.state is S.IDLE


def test_staging_stall_after_the_timeout_without_progress(rnd, clock) -> None:
    _to(rnd, S.STAGING)
    clock.now += TIMEOUT / 2
    assert not rnd.stalled(progressed=True)  # the clock restarts here
    clock.now += TIMEOUT
    assert not rnd.stalled(progressed=False)
    clock.now += 0.1
    assert rnd.stalled(progressed=False)


@pytest.mark.parametrize("state", sorted(set(S) - {S.SHUT_DOWN, S.OFF}, key=str))
def test_a_failed_vote_or_a_dead_worker_turns_off_from_any_live_state(
    rnd, state
) -> None:
    _to(rnd, state).turn_off()
    assert rnd.state is S.OFF and not rnd.in_flight
    with pytest.raises(RoundError, match="off -> aggregating"):
        rnd.begin()  # never again


@pytest.mark.parametrize("state", [S.PLANNING, S.PLANNED, S.SKIPPING, S.FAILED])
def test_a_peer_abort_before_staging_goes_back_to_idle(rnd, state) -> None:
    assert _to(rnd, state).abort() is False
    assert rnd.state is S.IDLE


@pytest.mark.parametrize("state", list(S))
def test_shutdown_from_any_state_is_final(rnd, state) -> None:
    if state is S.SHUT_DOWN:
        _to(rnd, state)
        with pytest.raises(RoundError):
            rnd.shut_down()
        return
    _to(rnd, state).shut_down()
    assert rnd.state is S.SHUT_DOWN and rnd.plans == []
    for move in (rnd.begin, rnd.turn_off, rnd.finish, rnd.recovered):
        with pytest.raises(RoundError, match="shut down ->"):
            move()


@pytest.mark.parametrize("state", list(S))
def test_every_move_outside_the_table_is_refused(state) -> None:
    """Each forward move is tried from each state: it works exactly when the
    table allows its target, and otherwise raises and changes nothing."""
    moves = [
        (S.AGGREGATING, lambda r: r.begin()),
        (S.PLANNING, lambda r: r.start_planning()),
        (S.PLANNED, lambda r: r.planned([], skip=False)),
        (S.STAGING, lambda r: r.submitted()),
    ]
    for target, move in moves:
        fresh = _to(RebalanceRound(TIMEOUT, Clock()), state)
        if target in TRANSITIONS[state]:
            move(fresh)
            assert fresh.state is target
        else:
            with pytest.raises(RoundError):
                move(fresh)
            assert fresh.state is state


@pytest.mark.parametrize("state", sorted(set(S) - {S.RECOVERING}, key=str))
def test_only_a_recovering_round_recovers(rnd, state) -> None:
    with pytest.raises(RoundError, match="nothing to recover"):
        _to(rnd, state).recovered()
    assert rnd.state is state


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        RebalanceRound(0.0)
