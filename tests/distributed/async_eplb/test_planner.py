"""Property tests of the pure transfer planner on random placements."""

from __future__ import annotations

import random

import pytest
import torch

from vllm.distributed.async_eplb.planner import (
    LayerPlan,
    LocalCopy,
    RankPlan,
    Transfer,
    plan_layer,
    plan_layers,
)


def random_placement(
    rng: random.Random, num_experts: int, num_ranks: int, slots_per_rank: int
) -> list[int]:
    """Every expert at least once; redundant slots may repeat on one rank."""
    num_slots = num_ranks * slots_per_rank
    row = list(range(num_experts))
    row += [rng.randrange(num_experts) for _ in range(num_slots - num_experts)]
    rng.shuffle(row)
    return row


def apply_plan(plan: LayerPlan, old: list[int], num_ranks: int) -> list[list[object]]:
    """Simulate staging + commit on per-rank 'weights' (the expert ids)."""
    spr = plan.slots_per_rank
    weights = [list(old[r * spr : (r + 1) * spr]) for r in range(num_ranks)]
    staged: list[dict[int, object]] = [{} for _ in range(num_ranks)]
    for rp in plan.ranks:
        for c in rp.local_copies:
            assert weights[rp.rank][c.src_slot] == c.expert
            for s in c.dst_slots:
                staged[rp.rank][s] = weights[rp.rank][c.src_slot]
        for t in rp.receives:
            assert weights[t.src_rank][t.src_slot] == t.expert
            for s in t.dst_slots:
                staged[rp.rank][s] = weights[t.src_rank][t.src_slot]
    for rp in plan.ranks:
        assert sorted(staged[rp.rank]) == list(rp.changed_slots)
        assert not set(rp.kept_slots) & set(rp.changed_slots)
        assert sorted(rp.kept_slots + rp.changed_slots) == list(range(spr))
        for s, value in staged[rp.rank].items():
            weights[rp.rank][s] = value
    return weights


@pytest.mark.parametrize("seed", range(40))
def test_plan_applies_exactly_and_respects_locality(seed: int) -> None:
    rng = random.Random(seed)
    num_ranks = rng.choice([1, 2, 4, 6, 8])
    ranks_per_node = rng.choice([d for d in (1, 2, 4) if num_ranks % d == 0])
    slots_per_rank = rng.randint(1, 6)
    num_experts = rng.randint(
        max(1, num_ranks * slots_per_rank // 2), num_ranks * slots_per_rank
    )
    old = random_placement(rng, num_experts, num_ranks, slots_per_rank)
    new = random_placement(rng, num_experts, num_ranks, slots_per_rank)
    plan = plan_layer(torch.tensor(old), torch.tensor(new), num_ranks, ranks_per_node)

    weights = apply_plan(plan, old, num_ranks)
    flat = [e for rank in weights for e in rank]
    assert flat == new

    for rp in plan.ranks:
        received = [t.expert for t in rp.receives]
        assert len(received) == len(set(received)), "expert received twice"
        local_old = set(old[rp.rank * slots_per_rank : (rp.rank + 1) * slots_per_rank])
        for t in rp.receives:
            assert t.expert not in local_old, "received what the rank already holds"
            holders = {p // slots_per_rank for p, e in enumerate(old) if e == t.expert}
            same_node = {
                h for h in holders if h // ranks_per_node == rp.rank // ranks_per_node
            }
            if same_node:
                assert t.src_rank in same_node, "crossed nodes needlessly"
        assert [(t.src_rank, t.expert) for t in rp.receives] == sorted(
            (t.src_rank, t.expert) for t in rp.receives
        )
        assert [(t.dst_rank, t.expert) for t in rp.sends] == sorted(
            (t.dst_rank, t.expert) for t in rp.sends
        )
    all_receives = sorted(plan.transfers(), key=repr)
    all_sends = sorted((t for rp in plan.ranks for t in rp.sends), key=repr)
    assert all_receives == all_sends


def test_duplicates_received_once_and_sending_is_spread() -> None:
    # 4 ranks x 2 slots; experts 0 and 1 each held by two ranks; rank 3 wants
    # expert 0 twice and rank 2 wants 1 twice.
    old = [0, 1, 0, 1, 2, 3, 4, 5]
    new = [0, 1, 0, 1, 1, 1, 0, 0]
    plan = plan_layer(old, new, num_ranks=4, ranks_per_node=4)
    r2, r3 = plan.ranks[2], plan.ranks[3]
    assert [(t.expert, t.dst_slots) for t in r2.receives] == [(1, (0, 1))]
    assert [(t.expert, t.dst_slots) for t in r3.receives] == [(0, (0, 1))]
    assert len(plan.ranks[0].sends) + len(plan.ranks[1].sends) == 2
    assert len(plan.ranks[0].sends) == 1


def test_cross_node_only_without_same_node_holder() -> None:
    # 4 ranks, 2 per node, 1 slot each: expert 0 lives on node 0 only.
    plan = plan_layer([0, 1, 2, 3], [0, 0, 0, 3], num_ranks=4, ranks_per_node=2)
    (t1,) = plan.ranks[1].receives
    (t2,) = plan.ranks[2].receives
    assert t1.src_rank == 0 and t2.src_rank == 0


def test_noop_and_local_copy() -> None:
    plan = plan_layer([0, 1, 2, 3], [0, 1, 2, 3], 2, 2)
    assert plan.is_noop
    plan = plan_layer([0, 1, 2, 3], [1, 0, 2, 3], 2, 2)
    assert not plan.is_noop
    assert plan.ranks[0].local_copies and not plan.ranks[0].receives
    assert plan.ranks[0].changed_slots == (0, 1)


def test_every_rank_derives_the_same_plan() -> None:
    rng = random.Random(7)
    old = torch.tensor([random_placement(rng, 12, 4, 4) for _ in range(3)])
    new = torch.tensor([random_placement(rng, 12, 4, 4) for _ in range(3)])
    assert plan_layers(old, new, 4, 2) == plan_layers(old.clone(), new.clone(), 4, 2)


@pytest.mark.parametrize(
    ("old", "new", "num_ranks", "ranks_per_node", "match"),
    [
        ([0, 1, 2], [0, 1, 2], 2, 1, "not divisible by 2 ranks"),
        ([0, 1], [0, 1, 1], 1, 1, "old row has 2 slots"),
        ([0, 1], [0, 2], 1, 1, "expert 2"),
        ([0, -1], [0, 0], 1, 1, "negative expert id -1"),
        ([0, 1], [0, 1], 0, 1, "num_ranks must be > 0"),
        ([0, 1], [0, 1], 1, 0, "ranks_per_node must be > 0"),
    ],
)
def test_bad_input_names_the_value(old, new, num_ranks, ranks_per_node, match):
    with pytest.raises(ValueError, match=match):
        plan_layer(old, new, num_ranks, ranks_per_node)


def test_plan_layers_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(1, 4\)"):
        plan_layers(
            torch.zeros(2, 4, dtype=torch.long),
            torch.zeros(1, 4, dtype=torch.long),
            2,
            1,
        )


def _reference_plan(
    old: list[int], new: list[int], num_ranks: int, ranks_per_node: int
) -> LayerPlan:
    """The planner's semantics written plainly, one slot at a time (the
    implementation before it was vectorised): the vectorised planner must
    give the very same plan, object for object."""
    spr = len(old) // num_ranks
    holders: dict[int, dict[int, int]] = {}
    for phys, expert in enumerate(old):
        holders.setdefault(expert, {}).setdefault(phys // spr, phys % spr)
    kept: list[list[int]] = [[] for _ in range(num_ranks)]
    copies: list[list[LocalCopy]] = [[] for _ in range(num_ranks)]
    needed: list[dict[int, list[int]]] = [{} for _ in range(num_ranks)]
    for rank in range(num_ranks):
        wanted: dict[int, list[int]] = {}
        for slot in range(spr):
            phys = rank * spr + slot
            if old[phys] == new[phys]:
                kept[rank].append(slot)
            else:
                wanted.setdefault(new[phys], []).append(slot)
        for expert in sorted(wanted):
            src_slot = holders[expert].get(rank)
            if src_slot is not None:
                copies[rank].append(LocalCopy(expert, src_slot, tuple(wanted[expert])))
            else:
                needed[rank][expert] = wanted[expert]
    send_count = [0] * num_ranks
    receives: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    sends: list[list[Transfer]] = [[] for _ in range(num_ranks)]
    requests = sorted(
        (len(holders[e]), e, r) for r in range(num_ranks) for e in needed[r]
    )
    for _, expert, dst in requests:
        node = dst // ranks_per_node
        src = min(
            holders[expert],
            key=lambda s: (
                0 if s // ranks_per_node == node else 1,
                send_count[s],
                (s - dst) % num_ranks,
            ),
        )
        send_count[src] += 1
        t = Transfer(expert, src, holders[expert][src], dst, tuple(needed[dst][expert]))
        receives[dst].append(t)
        sends[src].append(t)
    return LayerPlan(
        num_ranks,
        spr,
        tuple(
            RankPlan(
                r,
                tuple(kept[r]),
                tuple(copies[r]),
                tuple(sorted(receives[r], key=lambda t: (t.src_rank, t.expert))),
                tuple(sorted(sends[r], key=lambda t: (t.dst_rank, t.expert))),
            )
            for r in range(num_ranks)
        ),
    )


@pytest.mark.parametrize("seed", range(60))
def test_the_vectorised_planner_gives_the_reference_plan(seed: int) -> None:
    rng = random.Random(seed)
    # From toy sizes to fleet sizes (DeepSeek-V3 on 320 ranks, 8 a node).
    num_ranks = rng.choice([1, 2, 3, 4, 8, 16, 64, 320])
    ranks_per_node = rng.choice([d for d in (1, 2, 4, 8) if num_ranks % d == 0])
    slots_per_rank = rng.randint(1, 6 if num_ranks < 64 else 2)
    num_slots = num_ranks * slots_per_rank
    num_experts = rng.randint(max(1, num_slots // 2), num_slots)
    old = random_placement(rng, num_experts, num_ranks, slots_per_rank)
    # A few slots to all of them move; sometimes replicas change count too.
    new = list(old)
    moved = [p for p in range(num_slots) if rng.random() < rng.random()]
    shuffled = [new[p] for p in moved]
    rng.shuffle(shuffled)
    for p, e in zip(moved, shuffled, strict=True):
        new[p] = e
    if rng.random() < 0.5:
        new[rng.randrange(num_slots)] = new[rng.randrange(num_slots)]
    expected = _reference_plan(old, new, num_ranks, ranks_per_node)
    assert plan_layer(old, new, num_ranks, ranks_per_node) == expected
    assert (
        plan_layer(torch.tensor(old), torch.tensor(new), num_ranks, ranks_per_node)
        == expected
    )
    (from_batch,) = plan_layers(
        torch.tensor([old]), torch.tensor([new]), num_ranks, ranks_per_node
    )
    assert from_batch == expected
