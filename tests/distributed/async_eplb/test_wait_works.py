"""wait_works reports whom it waits for, and gives up on abort: fake works."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from fake_works import FakeWork, until

from vllm.distributed.async_eplb.transports import TransferError
from vllm.distributed.async_eplb.transports.p2p import (
    DeviceWaiter,
    wait_on_device,
    wait_works,
)


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
                abandon=kw.get("abandon", lambda items: None),
            )
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("pollable", [True, False], ids=["polled", "gloo"])
def test_progress_names_the_peer_still_waited_for(pollable: bool) -> None:
    works = [FakeWork(), FakeWork(), FakeWork()]
    reports: list[tuple[int, ...]] = []
    works[0].done.set()
    works[2].done.set()
    thread, errors = _wait_in_thread(
        works, [[1], [2], [3]], pollable=pollable, reports=reports
    )
    until(lambda: reports and reports[-1] == (2,))
    assert thread.is_alive()  # rank 2's message is the one missing
    works[1].done.set()
    thread.join(5)
    assert not errors
    assert reports[-1] == ()  # the wait ended: waiting for nobody


def test_gloo_abort_returns_at_once_and_the_abandoned_wait_reports_its_end() -> None:
    work = FakeWork()
    reports: list[tuple[int, ...]] = []
    aborted = threading.Event()
    abandoned: list[threading.Thread] = []
    thread, errors = _wait_in_thread(
        [work],
        [[5]],
        pollable=False,
        reports=reports,
        should_abort=aborted.is_set,
        abandon=abandoned.extend,
    )
    until(lambda: reports == [(5,)])
    aborted.set()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], TransferError)
    assert errors[0].peers == (5,)
    (helper,) = abandoned  # handed over, still waiting for rank 5
    assert helper.is_alive()
    work.done.set()
    until(lambda: not helper.is_alive())
    assert reports[-1] == ()


class FakeStreamWork:
    """A device-collective work: ``wait`` only orders the caller's stream."""

    def __init__(self) -> None:
        self.waited = False

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.waited = True
        return True


class FakeBackend:
    """The event after the works completes when ``landed`` is set."""

    def __init__(self) -> None:
        self.landed = threading.Event()
        self.recorded = 0

    def new_event(self) -> str:
        return "done"

    def record_event(self, event: str) -> None:
        self.recorded += 1

    def synchronize_event(self, event: str) -> None:
        self.landed.wait()


def _device_wait_in_thread(works, backend, *, reports: list, **kw):
    errors: list[BaseException] = []
    ended: list[float] = []

    def run() -> None:
        try:
            wait_on_device(
                works,
                [[1], [3]],
                backend,
                kw.get("timeout", 10.0),
                kw.get("should_abort", lambda: False),
                progress=lambda p: reports.append(tuple(p)),
                abandon=kw.get("abandon", lambda items: None),
            )
        except BaseException as exc:
            errors.append(exc)
        ended.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors, ended


def test_device_wait_orders_the_stream_then_wakes_when_the_bytes_land() -> None:
    works, backend = [FakeStreamWork(), FakeStreamWork()], FakeBackend()
    reports: list[tuple[int, ...]] = []
    thread, errors, ended = _device_wait_in_thread(works, backend, reports=reports)
    until(lambda: reports == [(1, 3)])
    assert all(w.waited for w in works) and backend.recorded == 1
    time.sleep(0.05)
    assert thread.is_alive()  # blocked on the event, not returned early
    landed = time.monotonic()
    backend.landed.set()
    thread.join(5)
    assert not errors and reports[-1] == ()
    assert ended[0] - landed < 0.05  # woken by the end, not by a poll period


def test_device_wait_gives_up_on_abort_and_on_timeout_naming_the_peers() -> None:
    aborted = threading.Event()
    reports: list[tuple[int, ...]] = []
    backend = FakeBackend()
    works = [FakeStreamWork()]
    abandoned: list = []
    thread, errors, _ = _device_wait_in_thread(
        works,
        backend,
        reports=reports,
        should_abort=aborted.is_set,
        abandon=abandoned.extend,
    )
    until(lambda: reports == [(1, 3)])
    aborted.set()
    thread.join(5)
    assert isinstance(errors[0], TransferError) and errors[0].peers == (1, 3)
    # The works, not the helper thread, are handed over: the transport counts
    # them until the device completes them (their receives may still land).
    assert abandoned == works
    start = time.monotonic()
    stuck = FakeBackend()
    thread, errors, _ = _device_wait_in_thread(
        [FakeStreamWork()], stuck, reports=[], timeout=0.2
    )
    thread.join(5)
    assert isinstance(errors[0], TransferError) and "timed out" in str(errors[0])
    assert 0.2 <= time.monotonic() - start < 2.0
    backend.landed.set()  # let the abandoned helper threads end
    stuck.landed.set()


class CountingBackend(FakeBackend):
    """Every event is done at once; the threads that waited on them kept."""

    def __init__(self) -> None:
        super().__init__()
        self.landed.set()
        self.waited_on: list[threading.Thread] = []

    def synchronize_event(self, event: str) -> None:
        self.waited_on.append(threading.current_thread())
        if event == "broken":
            raise RuntimeError("device error")


def test_a_waiter_serves_every_layer_on_one_thread_and_ends_when_dropped() -> None:
    backend = CountingBackend()
    waiter = DeviceWaiter(backend)
    for _ in range(3):
        wait_on_device(
            [FakeStreamWork()], [[1]], backend, 10.0, lambda: False, waiter=waiter
        )
    assert len(backend.waited_on) == 3 and len(set(backend.waited_on)) == 1
    (thread,) = set(backend.waited_on)
    assert thread.is_alive() and thread is not threading.current_thread()
    del waiter
    thread.join(5)
    assert not thread.is_alive()


def test_a_device_error_on_the_waiter_reaches_the_caller() -> None:
    backend = CountingBackend()
    backend.new_event = lambda: "broken"
    waiter = DeviceWaiter(backend)
    with pytest.raises(RuntimeError, match="device error"):
        wait_on_device(
            [FakeStreamWork()], [[1]], backend, 10.0, lambda: False, waiter=waiter
        )
    # the thread goes on serving the next wait
    backend.new_event = lambda: "done"
    wait_on_device(
        [FakeStreamWork()], [[1]], backend, 10.0, lambda: False, waiter=waiter
    )
    assert len(set(backend.waited_on)) == 1


_EXIT_SCRIPT = """
import atexit, threading, time

def report():  # registered first: runs after the transport module's hook
    alive = [t for t in threading.enumerate() if t.name == "async-eplb-wait"]
    print("waiters alive at exit:", len(alive))

atexit.register(report)
from vllm.distributed.async_eplb.transports.p2p import DeviceWaiter

class Backend:
    def synchronize_event(self, event):
        time.sleep(0.3)  # still blocked on a layer when the script ends

waiter = DeviceWaiter(Backend())
waiter.submit("layer")
"""


def test_waiter_threads_end_before_the_interpreter_finalizes() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "waiters alive at exit: 0" in done.stdout
