"""One rebalance round as an explicit state machine.

``EplbState`` decides *when* (the step clock, the votes); this object keeps
*where the round is*: its state, epoch, plans, local error and clocks, and it
refuses any transition not in :data:`TRANSITIONS`, so an impossible sequence
fails loudly instead of leaving the round half in two states. No process
group, no thread: unit-tested on its own.

::

    IDLE -> AGGREGATING -> PLANNING -> PLANNED -> STAGING -> IDLE (committed)
                                  \\-> SKIPPING -> IDLE (every rank skips)
                                  \\-> FAILED   -> IDLE (the vote aborts)
    STAGING -> RECOVERING (aborted once transfers started) -> IDLE
    any live state -> OFF (a dead worker, a failed vote, no spare group)
    any state -> SHUT_DOWN
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

__all__ = ["TRANSITIONS", "RebalanceRound", "RoundError", "RoundState"]


class RoundState(Enum):
    IDLE = "idle"
    AGGREGATING = "aggregating"  # the load vote is in flight
    PLANNING = "planning"  # the planner thread computes the plans
    PLANNED = "planned"  # plans ready; waiting for every rank's
    SKIPPING = "skipping"  # the gain is too small here; waiting for the vote
    FAILED = "failed"  # this rank cannot go on; the next vote aborts
    STAGING = "staging"  # jobs submitted; layers commit as votes allow
    RECOVERING = "recovering"  # aborted mid-transfer; waiting for every worker
    OFF = "off"  # balancing turned off for good
    SHUT_DOWN = "shut down"


_S = RoundState
_LIVE = {_S.IDLE, _S.AGGREGATING, _S.PLANNING, _S.PLANNED, _S.SKIPPING, _S.FAILED}
TRANSITIONS: dict[RoundState, frozenset[RoundState]] = {
    _S.IDLE: frozenset({_S.AGGREGATING}),
    _S.AGGREGATING: frozenset({_S.PLANNING, _S.IDLE}),
    _S.PLANNING: frozenset({_S.PLANNED, _S.SKIPPING, _S.FAILED, _S.IDLE}),
    _S.PLANNED: frozenset({_S.STAGING, _S.FAILED, _S.IDLE}),
    _S.SKIPPING: frozenset({_S.IDLE, _S.FAILED}),
    _S.FAILED: frozenset({_S.IDLE}),
    _S.STAGING: frozenset({_S.IDLE, _S.RECOVERING}),
    _S.RECOVERING: frozenset({_S.IDLE}),
    _S.OFF: frozenset(),
    _S.SHUT_DOWN: frozenset(),
}
for _state in _LIVE | {_S.STAGING, _S.RECOVERING}:
    TRANSITIONS[_state] |= {_S.OFF}
for _state in RoundState:
    if _state is not _S.SHUT_DOWN:
        TRANSITIONS[_state] |= {_S.SHUT_DOWN}


class RoundError(RuntimeError):
    """A transition the round's state machine does not allow (a bug)."""


class RebalanceRound:
    """The current rebalance of one ``EplbState``: state, epoch, plans, the
    layers each model still has to commit, this rank's error, and the
    planning and staging clocks."""

    def __init__(
        self, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._clock = clock
        self.state = RoundState.IDLE
        self.epoch = 0
        self.plans: list[Any] = []
        self.pending: list[list[int]] = []
        """Per model, layers submitted and not yet committed (while staging)."""
        self.local_error: str | None = None
        self.local_exc: BaseException | None = None
        self._plan_started = self._last_progress = clock()

    def _go(self, new: RoundState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RoundError(
                f"rebalance {self.epoch}: {self.state.value} -> {new.value} "
                "is not a transition of a round"
            )
        self.state = new

    # -- the round's path ---------------------------------------------------
    def begin(self) -> int:
        """A new round: its load vote is launched. Returns its epoch."""
        self._go(RoundState.AGGREGATING)
        self.epoch += 1
        return self.epoch

    def start_planning(self) -> None:
        """The load vote was read: the planner starts, its clock too."""
        self._go(RoundState.PLANNING)
        self._plan_started = self._last_progress = self._clock()

    def plan_overdue(self) -> bool:
        """Planning for longer than the timeout (checked by the caller)."""
        return (
            self.state is RoundState.PLANNING
            and self._clock() - self._plan_started > self.timeout_s
        )

    def planned(self, plans: list[Any], *, skip: bool) -> None:
        self._go(RoundState.SKIPPING if skip else RoundState.PLANNED)
        self.plans = plans

    def submitted(self, pending: Sequence[Sequence[int]] = ()) -> None:
        """Every rank planned: jobs are with the workers; ``pending`` holds
        each model's layers to commit."""
        self._go(RoundState.STAGING)
        self.pending = [list(layers) for layers in pending]
        self._last_progress = self._clock()

    def pending_layers(self, model: int) -> list[int]:
        """Layers of model ``model`` still to commit ([] outside staging)."""
        return self.pending[model] if model < len(self.pending) else []

    def layer_committed(self, model: int, layer: int) -> None:
        if self.state is not RoundState.STAGING or layer not in self.pending_layers(
            model
        ):
            raise RoundError(
                f"rebalance {self.epoch}: layer {layer} of model {model} is not "
                f"pending ({self.state.value})"
            )
        self.pending[model].remove(layer)

    def fail(self, cause: str, exc: BaseException | None = None) -> None:
        """This rank cannot finish the round; the first cause is kept.

        Before staging the round stops here (``FAILED``); while staging it
        stays ``STAGING`` (an abort must then recover the workers).
        """
        if self.local_error is None:
            self.local_error, self.local_exc = cause, exc
        if self.state in (_S.PLANNING, _S.PLANNED, _S.SKIPPING):
            self._go(RoundState.FAILED)

    def stalled(self, *, progressed: bool) -> bool:
        """Note staging progress; True once none for longer than the timeout."""
        now = self._clock()
        if progressed:
            self._last_progress = now
            return False
        return now - self._last_progress > self.timeout_s

    # -- endings ------------------------------------------------------------
    def abort(self) -> bool:
        """End after an abort; True if workers must be recovered first."""
        recover = self.state is RoundState.STAGING
        self._go(RoundState.RECOVERING if recover else RoundState.IDLE)
        self._clear()
        return recover

    def finish(self) -> None:
        """Every layer committed, every rank skipped, or drained."""
        self._go(RoundState.IDLE)
        self._clear()

    def recovered(self) -> None:
        """Every rank's workers are rebuilt after an abort mid-transfer."""
        if self.state is not RoundState.RECOVERING:
            raise RoundError(
                f"rebalance {self.epoch}: {self.state.value} -> "
                "recovered: nothing to recover"
            )
        self._go(RoundState.IDLE)

    def turn_off(self) -> None:
        self._go(RoundState.OFF)
        self._clear()

    def shut_down(self) -> None:
        self._go(RoundState.SHUT_DOWN)
        self._clear()

    def _clear(self) -> None:
        self.plans = []
        self.pending = []
        self.local_error = self.local_exc = None

    # -- questions ------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """Between ``begin`` and the round's end (vLLM's ``rebalanced``)."""
        return self.state in (
            _S.AGGREGATING,
            _S.PLANNING,
            _S.PLANNED,
            _S.SKIPPING,
            _S.FAILED,
            _S.STAGING,
        )
