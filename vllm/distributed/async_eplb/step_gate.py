"""Keeps this rank's background Python out of the engine's step.

Every torch call of ``EplbState.step()`` releases the GIL. A background thread
(staging, planner) that takes it then and runs Python keeps it until it
blocks or until CPython's switch interval (5 ms unless the user changed it)
forces it off, and the step waits that long: on the H200 host such steps
waited 1-4 ms with a few tenths of a millisecond of their own work.

The engine closes the gate for the length of its step; the staging and
planner threads pass it before each piece of Python work, and park there (GIL
released) while a step runs. A step then waits at most for the piece already
in progress. The wait is bounded, so a step that blocks (a late vote) does
not hold a thread up for longer than ``max_wait_s``. ``EplbState.step()``
wakes both threads as its last statements, before it opens the gate, so new
work starts once the step is over; a plan longer than a forward pass goes on
beside the next ones.
"""

from __future__ import annotations

import threading

__all__ = ["StepGate"]


class StepGate:
    """Closed while the engine is inside ``EplbState.step()``."""

    def __init__(self, max_wait_s: float = 0.05) -> None:
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be > 0, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        self._open = threading.Event()
        self._open.set()

    def close(self) -> None:
        """The engine's step begins."""
        self._open.clear()

    def open(self) -> None:
        """The engine's step has ended."""
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def wait(self) -> None:
        """Return once no step runs, or after ``max_wait_s`` at the latest."""
        self._open.wait(self.max_wait_s)
