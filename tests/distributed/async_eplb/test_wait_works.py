"""wait_works reports whom it waits for, and gives up on abort: fake works."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from vllm.distributed.async_eplb.transports import TransferError
from vllm.distributed.async_eplb.transports.p2p import (
    transfers_in_flight,
    wait_works,
)


class FakeWork:
    """Completes when ``done`` is set; ``wait`` blocks like gloo's."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self.done.wait(seconds):
            raise RuntimeError("fake work timed out")
        return True


def _wait_in_thread(works, peers, *, pollable: bool, reports: list, **kw):
    errors: list[BaseException] = []

    def run() -> None:
        try:
            wait_works(
                works,
                peers,
                kw.get("timeout", 10.0),
                kw.get("should_abort", lambda: False),
                pollable=pollable,
                progress=lambda p: reports.append(tuple(p)),
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.002)


@pytest.mark.parametrize("pollable", [True, False], ids=["polled", "gloo"])
def test_progress_names_the_peer_still_waited_for(pollable: bool) -> None:
    works = [FakeWork(), FakeWork(), FakeWork()]
    reports: list[tuple[int, ...]] = []
    works[0].done.set()
    works[2].done.set()
    thread, errors = _wait_in_thread(
        works, [[1], [2], [3]], pollable=pollable, reports=reports
    )
    _until(lambda: reports and reports[-1] == (2,))
    assert thread.is_alive()  # rank 2's message is the one missing
    works[1].done.set()
    thread.join(5)
    assert not errors
    assert reports[-1] == ()  # the wait ended: waiting for nobody


def test_gloo_abort_returns_at_once_and_the_abandoned_wait_reports_its_end() -> None:
    work = FakeWork()
    reports: list[tuple[int, ...]] = []
    aborted = threading.Event()
    thread, errors = _wait_in_thread(
        [work], [[5]], pollable=False, reports=reports, should_abort=aborted.is_set
    )
    _until(lambda: reports == [(5,)])
    aborted.set()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], TransferError)
    assert errors[0].peers == (5,)
    assert transfers_in_flight() == 1  # the helper still waits for rank 5
    work.done.set()
    _until(lambda: transfers_in_flight() == 0)
    assert reports[-1] == ()
