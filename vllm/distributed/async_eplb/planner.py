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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "LayerMoves",
    "LayerPlan",
    "LocalCopy",
    "RankPlan",
    "Transfer",
    "plan_layer",
    "plan_layer_moves",
    "plan_layers",
    "plan_layers_moves",
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


def _as_row(row: torch.Tensor | Sequence[int], name: str) -> np.ndarray:
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer ids, got dtype {row.dtype}")
        return row.to("cpu", torch.int64).numpy()
    return np.array([int(x) for x in row], dtype=np.int64)


def _check_layout(
    old: np.ndarray, new: np.ndarray, num_ranks: int, ranks_per_node: int
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
        negative = row[row < 0]
        if negative.size:
            raise ValueError(f"{name} row holds negative expert id {negative[0]}")
    held = np.zeros(int(max(old.max(), new.max())) + 1, dtype=bool)
    held[old] = True
    missing = new[~held[new]]
    if missing.size:
        raise ValueError(
            f"expert {missing.min()} of the new placement has no replica in the "
            "old placement, so no rank can send it"
        )
    return len(old) // num_ranks


@dataclass(frozen=True)
class LayerMoves:
    """One layer's plan as arrays, the form :func:`plan_layer`'s objects are
    built from (and what the fleet simulator counts, with no object per rank).

    The changed slots of a rank are grouped by the expert they receive, a
    group per ``(rank, expert)``, ordered by rank then expert; a group's slots
    are ``slots[offsets[g]:offsets[g + 1]]`` (ascending). A group whose
    ``src_rank`` is its own ``rank`` is a local copy from ``src_slot``; any
    other is a transfer from ``src_rank``'s ``src_slot``.
    """

    num_ranks: int
    slots_per_rank: int
    changed: np.ndarray  # [R, S] bool: the slot's expert changes
    rank: np.ndarray  # [G]
    expert: np.ndarray  # [G]
    src_rank: np.ndarray  # [G]
    src_slot: np.ndarray  # [G]
    offsets: np.ndarray  # [G + 1]
    slots: np.ndarray  # [changed slots]

    @property
    def is_transfer(self) -> np.ndarray:
        """``[G]`` True for groups received from another rank."""
        return self.src_rank != self.rank


def plan_layer_moves(
    old_row: torch.Tensor | Sequence[int],
    new_row: torch.Tensor | Sequence[int],
    num_ranks: int,
    ranks_per_node: int,
) -> LayerMoves:
    """The planner's decisions for one layer, as :class:`LayerMoves`.

    Vectorised but for the source choice among several holders, which
    depends on the sends chosen before it: experts with the fewest holders
    choose first (so scarce senders are not already loaded by experts that
    had alternatives), then by expert and destination; a single holder is
    the source whatever its load.
    """
    old = _as_row(old_row, "old_row")
    new = _as_row(new_row, "new_row")
    spr = _check_layout(old, new, num_ranks, ranks_per_node)
    return _moves(old, new, num_ranks, ranks_per_node, spr)


def _moves(
    old: np.ndarray, new: np.ndarray, num_ranks: int, ranks_per_node: int, spr: int
) -> LayerMoves:
    changed = old != new
    phys = np.flatnonzero(changed)
    rank = phys // spr
    # Changed slots grouped by (rank, expert), slots ascending within a group.
    order = np.lexsort((phys, new[phys], rank))
    phys, rank = phys[order], rank[order]
    expert = new[phys]
    boundary = np.ones(len(phys), dtype=bool)
    boundary[1:] = (rank[1:] != rank[:-1]) | (expert[1:] != expert[:-1])
    starts = np.flatnonzero(boundary)
    offsets = np.r_[starts, len(phys)]
    g_rank, g_expert = rank[starts], expert[starts]

    # Holders: every (expert, rank) of the old placement with its first slot,
    # ordered by expert then rank.
    key, first = np.unique(
        old * num_ranks + np.arange(len(old)) // spr, return_index=True
    )
    h_expert, h_rank, h_slot = key // num_ranks, key % num_ranks, first % spr
    h_count = np.bincount(h_expert, minlength=int(old.max()) + 1)
    h_start = np.cumsum(h_count) - h_count

    # A group the rank can fill from its own old slots is a local copy.
    wanted = g_expert * num_ranks + g_rank
    pos = np.minimum(np.searchsorted(key, wanted), len(key) - 1)
    local = key[pos] == wanted
    src_rank = np.where(local, g_rank, -1)
    src_slot = np.where(local, h_slot[pos], -1)

    request = np.flatnonzero(~local)
    count = h_count[g_expert[request]]
    request = request[np.lexsort((g_rank[request], g_expert[request], count))]
    count = h_count[g_expert[request]]
    single = request[count == 1]
    holder = h_start[g_expert[single]]
    src_rank[single], src_slot[single] = h_rank[holder], h_slot[holder]
    send_count = np.bincount(h_rank[holder], minlength=num_ranks).tolist()
    for g in request[count > 1].tolist():
        at = int(h_start[g_expert[g]])
        ranks = h_rank[at : at + int(h_count[g_expert[g]])].tolist()
        src = _choose_source(
            ranks, int(g_rank[g]), num_ranks, ranks_per_node, send_count
        )
        send_count[src] += 1
        src_rank[g], src_slot[g] = src, h_slot[at + ranks.index(src)]
    return LayerMoves(
        num_ranks,
        spr,
        changed.reshape(num_ranks, spr),
        g_rank,
        g_expert,
        src_rank,
        src_slot,
        offsets,
        phys % spr,
    )


def plan_layer(
    old_row: torch.Tensor | Sequence[int],
    new_row: torch.Tensor | Sequence[int],
    num_ranks: int,
    ranks_per_node: int,
) -> LayerPlan:
    """Plan one layer's move from ``old_row`` to ``new_row`` (both ``[P]``)."""
    return _build_plan(plan_layer_moves(old_row, new_row, num_ranks, ranks_per_node))


def _build_plan(moves: LayerMoves) -> LayerPlan:
    """:class:`LayerPlan` objects from the decisions: receives sorted by
    (source, expert), sends by (destination, expert); ranks without a
    change share their tuples."""
    spr = moves.slots_per_rank
    slots = moves.slots.tolist()
    offsets = moves.offsets.tolist()
    ranks, experts = moves.rank.tolist(), moves.expert.tolist()
    src_ranks, src_slots = moves.src_rank.tolist(), moves.src_slot.tolist()
    copies: dict[int, list[LocalCopy]] = {}
    transfers: list[Transfer | None] = []
    for g, (rank, expert, src, src_slot) in enumerate(
        zip(ranks, experts, src_ranks, src_slots, strict=True)
    ):
        dst_slots = tuple(slots[offsets[g] : offsets[g + 1]])
        if src == rank:
            copies.setdefault(rank, []).append(LocalCopy(expert, src_slot, dst_slots))
            transfers.append(None)
        else:
            transfers.append(Transfer(expert, src, src_slot, rank, dst_slots))
    moved = np.flatnonzero(moves.is_transfer)
    receives = _grouped(transfers, moved, moves.rank, moves.src_rank, moves.expert)
    sends = _grouped(transfers, moved, moves.src_rank, moves.rank, moves.expert)
    every_slot = tuple(range(spr))
    kept = {r: tuple(np.flatnonzero(~moves.changed[r]).tolist()) for r in set(ranks)}
    return LayerPlan(
        moves.num_ranks,
        spr,
        tuple(
            RankPlan(
                rank=r,
                kept_slots=kept.get(r, every_slot),
                local_copies=tuple(copies.get(r, ())),
                receives=receives.get(r, ()),
                sends=sends.get(r, ()),
            )
            for r in range(moves.num_ranks)
        ),
    )


def _grouped(
    transfers: list[Transfer | None],
    moved: np.ndarray,
    owner: np.ndarray,
    peer: np.ndarray,
    expert: np.ndarray,
) -> dict[int, tuple[Transfer, ...]]:
    """Transfers ``moved`` per ``owner`` rank, each sorted by (peer, expert)."""
    out: dict[int, list[Transfer]] = {}
    order = moved[np.lexsort((expert[moved], peer[moved], owner[moved]))]
    for g, rank in zip(order.tolist(), owner[order].tolist(), strict=True):
        out.setdefault(rank, []).append(transfers[g])  # type: ignore[arg-type]
    return {rank: tuple(ts) for rank, ts in out.items()}


def _choose_source(
    expert_holders: Iterable[int],
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


def _check_rows(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> None:
    if old_phy2log.dim() != 2 or old_phy2log.shape != new_phy2log.shape:
        raise ValueError(
            f"old and new phy2log must both be [L, P] of one shape, got "
            f"{tuple(old_phy2log.shape)} and {tuple(new_phy2log.shape)}"
        )


def plan_layers_moves(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    num_ranks: int,
    ranks_per_node: int,
) -> list[LayerMoves]:
    """:func:`plan_layer_moves` of every layer of ``[L, P]`` placements."""
    _check_rows(old_phy2log, new_phy2log)
    olds = old_phy2log.to("cpu", torch.int64).numpy()
    news = new_phy2log.to("cpu", torch.int64).numpy()
    out = []
    for old, new in zip(olds, news, strict=True):
        spr = _check_layout(old, new, num_ranks, ranks_per_node)
        out.append(_moves(old, new, num_ranks, ranks_per_node, spr))
    return out


def plan_layers(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    num_ranks: int,
    ranks_per_node: int,
) -> list[LayerPlan]:
    """Plan every layer of ``[L, P]`` placements (one :class:`LayerPlan` each)."""
    return [
        _build_plan(moves)
        for moves in plan_layers_moves(
            old_phy2log, new_phy2log, num_ranks, ranks_per_node
        )
    ]
