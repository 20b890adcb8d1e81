"""torchrun script (2 ranks): votes sum over ranks, are read D steps later
without any blocking collective, and a vote one rank never joins times out."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from vllm.distributed.async_eplb.agreement import (
    NonBlockingVote,
    VoteTimeout,
    private_group,
)
from vllm.distributed.async_eplb.simulation.collectives import CollectiveCounter


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = private_group([0, 1], [(0, 1)])
    vote = NonBlockingVote(group, delay=2, timeout_s=2.0)
    counter = CollectiveCounter()
    uninstall = counter.install()
    counter.armed = True
    seen = []
    for step in range(6):
        vote.launch(step, "ready", torch.tensor([rank + 1, step]))
        seen += [(r.launched_at, r.total.tolist()) for r in vote.collect(step)]
    counter.armed = False
    uninstall()
    assert counter.take() == 0
    assert seen == [(s, [3, 2 * s]) for s in range(4)], seen
    vote.drain()
    dist.barrier()
    if rank == 0:  # rank 1 never joins this one
        vote.launch(100, "ready", torch.tensor([1]))
        try:
            vote.collect(102)
        except VoteTimeout as exc:
            assert "still incomplete" in str(exc)
        else:
            raise AssertionError("expected a VoteTimeout")
    else:
        time.sleep(4.0)  # alive but never joining: rank 0 must time out
    print(f"VOTE OK rank {rank}", flush=True)
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
