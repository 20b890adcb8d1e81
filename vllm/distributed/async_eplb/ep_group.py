"""Who a rank is in its expert-parallel group, and every EP group of the world.

Creating our private process groups is a collective of the whole world, so
every rank must know every EP group's rank list, not only its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["EpGroupInfo"]


@dataclass(frozen=True)
class EpGroupInfo:
    """Who this rank is in its EP group, and every EP group of the world."""

    rank: int
    ranks: tuple[int, ...]
    all_rank_lists: tuple[tuple[int, ...], ...]
    ranks_per_node: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @classmethod
    def whole_world(cls, ranks_per_node: int | None = None) -> EpGroupInfo:
        """The default process group as the one EP group (tests, benchmarks)."""
        size = dist.get_world_size()
        ranks = tuple(range(size))
        return cls(dist.get_rank(), ranks, (ranks,), ranks_per_node or size)

    @classmethod
    def from_vllm(cls) -> EpGroupInfo:
        from vllm.distributed.parallel_state import (
            get_ep_group,
            get_node_count,
            get_world_group,
        )

        ep = get_ep_group()
        ranks = tuple(ep.ranks)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ranks, group=get_world_group().cpu_group)
        nodes = max(1, get_node_count())
        per_node = len(ranks) // nodes if len(ranks) % nodes == 0 else len(ranks)
        return cls(ep.rank_in_group, ranks, tuple(tuple(r) for r in gathered), per_node)
