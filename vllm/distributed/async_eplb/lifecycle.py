"""Ending one ``EplbState``: its threads, staging memory and process groups.

vLLM never calls ``EplbState.shutdown()``: every thread here is a daemon, so
at interpreter exit nothing waits for them and a transfer or plan in progress
is abandoned with the process. When ``shutdown()`` is called (tests, the
simulator, an engine that does), it ends this instance's threads only.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch.distributed as dist

from vllm.distributed.async_eplb.agreement import VoteError
from vllm.distributed.async_eplb.eplb_parts import EplbParts
from vllm.distributed.async_eplb.round_driver import RoundDriver
from vllm.distributed.async_eplb.staging_fleet import StagingFleet

__all__ = ["shut_down"]

logger = logging.getLogger(__name__)


def shut_down(
    parts: EplbParts, fleet: StagingFleet, driver: RoundDriver, timeout: float
) -> None:
    """Stop and join this instance's threads, free staging, destroy groups.

    Every rank calls it (the engine shuts all ranks down), also in the middle
    of a rebalance: workers end after the layer they are in, which their peers
    are finishing too. A thread still inside a transfer after ``timeout``
    seconds keeps its staging group alive (destroying a group under a waiting
    thread is unsafe); it is a daemon and cannot block the process's exit.
    """
    if parts.recorder is not None:
        parts.recorder.close()
    deadline = time.monotonic() + timeout
    stuck = fleet.stop(timeout)
    driver.planner.stop(max(0.0, deadline - time.monotonic()))
    if stuck:
        logger.warning(
            "async EPLB: threads %s still inside a transfer %.1f s after "
            "shutdown; their process groups are left to the process exit",
            stuck,
            timeout,
        )
    fleet.release()
    _destroy_groups(parts, fleet.groups.release(keep_in_use=bool(stuck)))


def _destroy_groups(parts: EplbParts, groups: list) -> None:
    """Destroy the private gloo groups (local: no collective needed).

    Votes still in flight are waited for first (every rank launched them,
    within the vote timeout); a group with a stuck vote is left alone.
    """
    vote = parts.vote
    with contextlib.suppress(VoteError):  # failed: said below
        vote.drain()
    if vote.failed is None:
        groups.append(vote.group)
    else:
        logger.warning("async EPLB: vote group left open: %s", vote.failed)
    if not dist.is_initialized():
        return  # the world (and every group in it) is already gone
    for group in groups:
        if group is not None:
            dist.destroy_process_group(group)
