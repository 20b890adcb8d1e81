"""Transfer planner: which rank sends which expert to whom, for one layer.

Pure: every rank calls :func:`plan_layer` with the same old and new placement
and gets the same global plan, so no communication is needed to agree on it.

Semantics (the contract the transports and the worker rely on): for every
*changed* local slot ``s`` of rank ``r`` (its expert differs between the old and
the new placement) the staging buffer row ``s`` receives the new expert's rows,
either from a local copy of the old workspace or from a receive; kept slots are
never touched. A received expert that fills several slots of one rank is
received once (a duplicate: ``dst_slots`` has more than one entry).

Sources are chosen by locality: the rank itself, then a rank of the same node,
then any other rank; among equally close holders the one with the fewest sends
so far is chosen, so sending work is spread over the replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LayerPlan",
    "LocalCopy",
    "RankPlan",
    "Transfer",
    "plan_layer",
    "plan_layers",
]


@dataclass(frozen=True)
class Transfer:
    """One expert travelling from ``src_rank`` to ``dst_rank`` (received once)."""

    expert: int
    src_rank: int
    src_slot: int  # local slot on the source rank (old placement)
    dst_rank: int
    dst_slots: tuple[int, ...]  # local slots on the destination (>1: duplicate)


@dataclass(frozen=True)
class LocalCopy:
    """An expert the rank already holds, copied into its changed slots."""

    expert: int
    src_slot: int
    dst_slots: tuple[int, ...]


@dataclass(frozen=True)
class RankPlan:
    rank: int
    kept_slots: tuple[int, ...]
    local_copies: tuple[LocalCopy, ...]
    receives: tuple[Transfer, ...]  # sorted by (src_rank, expert)
    sends: tuple[Transfer, ...]  # sorted by (dst_rank, expert)

    @property
    def changed_slots(self) -> tuple[int, ...]:
        """Sorted local slots whose expert changes (staged, then committed)."""
        slots = [s for c in self.local_copies for s in c.dst_slots]
        slots += [s for t in self.receives for s in t.dst_slots]
        return tuple(sorted(slots))


@dataclass(frozen=True)
class LayerPlan:
    num_ranks: int
    slots_per_rank: int
    ranks: tuple[RankPlan, ...]

    @property
    def is_noop(self) -> bool:
        """True when no slot of any rank changes expert."""
        return all(not r.local_copies and not r.receives for r in self.ranks)

    def transfers(self) -> list[Transfer]:
        """Every transfer of the layer, ordered by (dst_rank, src_rank, expert)."""
        return [t for r in self.ranks for t in r.receives]


def _as_row(row: torch.Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got dtype {row.dtype}")
        return [int(x) for x in row.tolist()]
    return [int(x) for x in row]


def _check_layout(
    old: list[int], new: list[int], num_ranks: int, ranks_per_node: int
) -> int:
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be > 0, got {num_ranks}")
    if ranks_per_node <= 0:
        raise ValueError(f"ranks_per_node must be > 0, got {ranks_per_node}")
    if len(old) != len(new):
        raise ValueError(
            f"old row has {len(old)} slots but new row has {len(new)} slots"
        )
    if len(old) == 0 or len(old) % num_ranks != 0:
        raise ValueError(
            f"{len(old)} physical slots are not divisible by {num_ranks} ranks"
        )
    for name, row in (("old", old), ("new", new)):
        negative = [x for x in row if x < 0]
        if negative:
            raise ValueError(f"{name} row holds negative expert id {negative[0]}")
    missing = set(new) - set(old)
    if missing:
        raise ValueError(
            f"expert {min(missing)} of the new placement has no replica in the "
            "old placement, so no rank can send it"
        )
    return len(old) // num_ranks


def plan_layer(
    old_row: torch.Tensor | Sequence[int],
    new_row: torch.Tensor | Sequence[int],
    num_ranks: int,
    ranks_per_node: int,
) -> LayerPlan:
    """Plan one layer's move from ``old_row`` to ``new_row`` (both ``[P]``)."""
    old = _as_row(old_row, "old_row")
    new = _as_row(new_row, "new_row")
    slots_per_rank = _check_layout(old, new, num_ranks, ranks_per_node)

    # holders[e] = {rank: first local slot holding e in the old placement}
    holders: dict[int, dict[int, int]] = {}
    for phys, expert in enumerate(old):
        holders.setdefault(expert, {}).setdefault(
            phys // slots_per_rank, phys % slots_per_rank
        )

    kept: list[list[int]] = [[] for _ in range(num_ranks)]
    copies: list[list[LocalCopy]] = [[] for _ in range(num_ranks)]
    # needed[r] = {expert: [dst slots]} for experts rank r must receive
    needed: list[dict[int, list[int]]] = [{} for _ in range(num_ranks)]
    for rank in range(num_ranks):
        base = rank * slots_per_rank
        wanted: dict[int, list[int]] = {}
        for slot in range(slots_per_rank):
            if old[base + slot] == new[base + slot]:
                kept[rank].append(slot)
            else:
                wanted.setdefault(new[base + slot], []).append(slot)
        for expert in sorted(wanted):
            src_slot = holders[expert].get(rank)
            if src_slot is not None:
                copies[rank].append(LocalCopy(expert, src_slot, tuple(wanted[expert])))
            else:
                needed[rank][expert] = wanted[expert]

    send_count = [0] * num_ranks
    receives: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    sends: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    # Experts with the fewest holders choose first, so scarce senders are not
    # already loaded by experts that had alternatives.
    requests = sorted(
        ((len(holders[e]), e, r) for r in range(num_ranks) for e in needed[r]),
    )
    for _, expert, dst in requests:
        src = _choose_source(
            holders[expert], dst, num_ranks, ranks_per_node, send_count
        )
        send_count[src] += 1
        transfer = Transfer(
            expert, src, holders[expert][src], dst, tuple(needed[dst][expert])
        )
        receives[dst].append(transfer)
        sends[src].append(transfer)

    ranks = tuple(
        RankPlan(
            rank=r,
            kept_slots=tuple(kept[r]),
            local_copies=tuple(copies[r]),
            receives=tuple(sorted(receives[r], key=lambda t: (t.src_rank, t.expert))),
            sends=tuple(sorted(sends[r], key=lambda t: (t.dst_rank, t.expert))),
        )
        for r in range(num_ranks)
    )
    return LayerPlan(num_ranks, slots_per_rank, ranks)


def _choose_source(
    expert_holders: dict[int, int],
    dst: int,
    num_ranks: int,
    ranks_per_node: int,
    send_count: list[int],
) -> int:
    """Closest holder (same node before other nodes), least loaded first.

    Ties go to the holder that follows ``dst`` in ring order, so equal loads
    spread instead of piling on the lowest rank id.
    """
    node = dst // ranks_per_node

    def key(src: int) -> tuple[int, int, int]:
        tier = 0 if src // ranks_per_node == node else 1
        return (tier, send_count[src], (src - dst) % num_ranks)

    return min(expert_holders, key=key)


def plan_layers(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    num_ranks: int,
    ranks_per_node: int,
) -> list[LayerPlan]:
    """Plan every layer of ``[L, P]`` placements (one :class:`LayerPlan` each)."""
    if old_phy2log.dim() != 2 or old_phy2log.shape != new_phy2log.shape:
        raise ValueError(
            f"old and new phy2log must both be [L, P] of one shape, got "
            f"{tuple(old_phy2log.shape)} and {tuple(new_phy2log.shape)}"
        )
    old_rows = old_phy2log.to("cpu", torch.int64).tolist()
    new_rows = new_phy2log.to("cpu", torch.int64).tolist()
    return [
        plan_layer(o, n, num_ranks, ranks_per_node)
        for o, n in zip(old_rows, new_rows, strict=True)
    ]
