"""Replica consistency: digests, comparisons, heal rows (pure, one process)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.consistency import (
    StaleReplica,
    describe_stale,
    expected_digests,
    find_stale_replicas,
    primary_slots,
    slot_digests,
    source_row,
    weights_digests,
)
from vllm.distributed.async_eplb.device import DeviceBackend
from vllm.distributed.async_eplb.planner import plan_layer
from vllm.distributed.async_eplb.replica_check import (
    ReplicaCheck,
    gather_digests,
    local_slot_digests,
)


def _layer(num_slots: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Three tensors like a quantised expert: bf16 weights, fp32 bias, uint8
    scales whose row (7 bytes) is not a multiple of 4."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(num_slots, 24, 40, generator=gen).to(torch.bfloat16)
    bias = torch.randn(num_slots, 24, generator=gen)
    scale = torch.randint(0, 256, (num_slots, 7), generator=gen).to(torch.uint8)
    return [w, bias, scale]


def _copy_slot(layer: list[torch.Tensor], dst: int, src: int) -> None:
    for t in layer:
        t[dst].copy_(t[src])


def test_equal_bytes_equal_digests_wherever_they_sit() -> None:
    layer = _layer()
    _copy_slot(layer, 4, 1)
    d = slot_digests(layer)
    assert d.dtype == torch.int64 and d.shape == (6,)
    assert int(d[4]) == int(d[1])
    assert len(set(d.tolist())) == 5  # the other slots are distinct
    # Independent of the chunking, and of digesting a slice.
    assert torch.equal(slot_digests(layer, chunk_elements=5), d)
    assert torch.equal(slot_digests([t[3:5] for t in layer]), d[3:5])
    assert torch.equal(local_slot_digests(layer, [5, 1, 2]), d[[1, 2, 5]])


@pytest.mark.parametrize("tensor", [0, 1, 2])
def test_any_single_byte_change_is_seen(tensor: int) -> None:
    layer = _layer()
    before = slot_digests(layer)
    gen = torch.Generator().manual_seed(tensor)
    raw = layer[tensor].view(torch.uint8).reshape(6, -1)
    for _ in range(40):
        slot = int(torch.randint(0, 6, (1,), generator=gen))
        pos = int(torch.randint(0, raw.shape[1], (1,), generator=gen))
        bit = 1 << int(torch.randint(0, 8, (1,), generator=gen))
        raw[slot, pos] ^= bit
        after = slot_digests(layer)
        assert int(after[slot]) != int(before[slot]), (slot, pos, bit)
        others = [s for s in range(6) if s != slot]
        assert torch.equal(after[others], before[others])
        raw[slot, pos] ^= bit  # restore
    assert torch.equal(slot_digests(layer), before)


def test_position_and_tensor_order_matter() -> None:
    x = torch.arange(2 * 8192, dtype=torch.int32).reshape(2, 8192)
    swapped = x.clone()
    swapped[0, [3, 5000]] = swapped[0, [5000, 3]]  # same words, other places
    assert int(slot_digests([swapped])[0]) != int(slot_digests([x])[0])
    y = x.flip(1).contiguous()
    assert int(slot_digests([x, y])[0]) != int(slot_digests([y, x])[0])


def test_layout_does_not_change_the_digest() -> None:
    base = torch.randn(5 * 6 * 10 + 1).to(torch.bfloat16)
    misaligned = base[1:].view(5, 6, 10)  # storage offset of 2 bytes
    assert torch.equal(slot_digests([misaligned]), slot_digests([misaligned.clone()]))
    wide = torch.randn(5, 10, 6)
    strided = wide.transpose(1, 2)  # not contiguous
    assert torch.equal(slot_digests([strided]), slot_digests([strided.contiguous()]))
    empty = torch.empty(5, 0)
    assert torch.equal(slot_digests([empty]), torch.zeros(5, dtype=torch.int64))


def test_weights_digests_stacks_layers() -> None:
    layers = [_layer(seed=0), _layer(seed=1)]
    d = weights_digests(layers)
    assert d.shape == (2, 6)
    assert torch.equal(d[1], slot_digests(layers[1]))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="at least one"):
        slot_digests([])
    with pytest.raises(ValueError, match=r"shape \(5, 3\).*6 slots"):
        slot_digests([torch.zeros(6, 3), torch.zeros(5, 3)])
    with pytest.raises(ValueError, match="no layers"):
        weights_digests([])
    with pytest.raises(ValueError, match=r"phy2log \(1, 4\) and digests \(1, 3\)"):
        find_stale_replicas(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match="names expert 9"):
        primary_slots(torch.tensor([[0, 9]]), 4)
    with pytest.raises(ValueError, match="stale slot 7"):
        source_row([0, 1, 0], [7], 2)


def test_primary_slots_lowest_slot_and_unused() -> None:
    phy2log = torch.tensor([[2, 0, 1, 0, 2, -1], [1, 1, 0, -1, -1, 0]])
    assert primary_slots(phy2log, 4).tolist() == [[1, 2, 0, -1], [2, 0, -1, -1]]


def test_find_stale_replicas_against_the_primary() -> None:
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]])
    digests = torch.tensor([[10, 11, 12, 13, 10, 99], [20, 21, 22, 23, 77, 88]])
    stale = find_stale_replicas(phy2log, digests, 4)
    assert stale == [
        StaleReplica(0, 5, 1, 1),
        StaleReplica(1, 4, 2, 2),
        StaleReplica(1, 5, 3, 3),
    ]
    assert expected_digests(phy2log, digests, 4).tolist() == [
        [10, 11, 12, 13],
        [20, 21, 22, 23],
    ]
    healthy = digests.clone()
    healthy[0, 5], healthy[1, 4], healthy[1, 5] = 11, 22, 23
    assert find_stale_replicas(phy2log, healthy, 4) == []
    # Unused slots are never stale; an expert with no slot digests to 0.
    sparse = torch.tensor([[0, -1, 1, 0]])
    assert find_stale_replicas(sparse, torch.tensor([[5, 6, 7, 5]]), 3) == []
    assert expected_digests(sparse, torch.tensor([[5, 6, 7, 5]]), 3).tolist() == [
        [5, 7, 0]
    ]


def test_source_row_plans_exactly_the_stale_slots_from_healthy_ones() -> None:
    # 2 ranks x 5 slots; experts 0..3 replicated; slots 4, 6 and 9 are stale.
    row = [0, 1, 2, 3, 0, 1, 0, 2, 3, 0]
    stale = [4, 6, 9]
    src = source_row(row, stale, 4)
    assert src == [0, 1, 2, 3, 4, 1, 5, 2, 3, 6]
    plan = plan_layer(src, row, num_ranks=2, ranks_per_node=2)
    changed = {r.rank * 5 + s for r in plan.ranks for s in r.changed_slots}
    assert changed == set(stale)
    # Rank 1 has no healthy expert 0: it receives it once from rank 0's slot
    # 0 (never from a stale slot), for both of its stale slots.
    (transfer,) = plan.ranks[1].receives
    assert (transfer.expert, transfer.src_rank, transfer.src_slot) == (0, 0, 0)
    assert transfer.dst_slots == (1, 4)
    (copy,) = plan.ranks[0].local_copies
    assert (copy.expert, copy.src_slot, copy.dst_slots) == (0, 0, (4,))


def test_describe_stale_groups_layers_and_ranges() -> None:
    stale = [
        StaleReplica(layer, slot, 0, 0) for layer in (0, 1, 2, 5) for slot in (16, 17)
    ]
    stale.append(StaleReplica(7, 3, 0, 0))
    assert (
        describe_stale(stale) == "MoE layers 0-2, 5: slots 16-17; MoE layer 7: slot 3"
    )
    assert describe_stale([]) == "none"


def test_gather_digests_single_rank_is_local() -> None:
    local = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(gather_digests(local, None), local)


def _fake_state(layer: list[torch.Tensor], name: str = "m") -> SimpleNamespace:
    model = SimpleNamespace(expert_weights=[layer], num_local_physical_experts=6)
    return SimpleNamespace(model=model, model_name=name)


def test_commit_check_finds_a_wrong_slot_without_a_collective() -> None:
    """After a commit, changed slots are compared with the start-up digests
    of the experts the plan put there (single rank, CPU: compared at once)."""
    layer = _layer()
    state = _fake_state(layer)
    check = ReplicaCheck(AsyncEplbConfig(check_after_rebalance=True))
    row = [0, 1, 2, 3, 4, 5]
    digests = slot_digests(layer)[None]
    check._backend = DeviceBackend.for_device("cpu")
    check._expected[id(state)] = (
        state,
        expected_digests(torch.tensor([row]), digests, 6),
    )
    # The move: slot 4 gets expert 1, slot 5 gets expert 2.
    new_row = [0, 1, 2, 3, 1, 2]
    plan = plan_layer(row, new_row, 1, 1)
    _copy_slot(layer, 4, 1)
    _copy_slot(layer, 5, 3)  # wrong: should be expert 2's weights
    check.committed(state, 0, plan, 0)
    assert check.slots_checked == 2
    assert [(m.layer, m.slot, m.expert) for m in check.mismatches] == [(0, 5, 2)]
    off = ReplicaCheck(AsyncEplbConfig(check_after_rebalance=False))
    off._expected = check._expected
    off.committed(state, 0, plan, 0)
    assert off.slots_checked == 0 and not off.mismatches


def test_commit_check_default_follows_debug_logging() -> None:
    import logging

    logger = logging.getLogger("vllm.distributed.async_eplb.replica_check")
    old = logger.level
    try:
        logger.setLevel(logging.DEBUG)
        assert ReplicaCheck(AsyncEplbConfig()).after_rebalance
        logger.setLevel(logging.INFO)
        assert not ReplicaCheck(AsyncEplbConfig()).after_rebalance
    finally:
        logger.setLevel(old)


def test_config_knobs_from_env() -> None:
    config = AsyncEplbConfig.from_env(
        {
            "VLLM_ASYNC_EPLB_HEAL_REPLICAS": "0",
            "VLLM_ASYNC_EPLB_CHECK_AFTER_REBALANCE": "yes",
        }
    )
    assert config.heal_replicas is False and config.check_after_rebalance is True
    defaults = AsyncEplbConfig.from_env({})
    assert defaults.heal_replicas is True and defaults.check_after_rebalance is None
    with pytest.raises(ValueError, match="VLLM_ASYNC_EPLB_HEAL_REPLICAS='maybe'"):
        AsyncEplbConfig.from_env({"VLLM_ASYNC_EPLB_HEAL_REPLICAS": "maybe"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_digests_equal_host_digests() -> None:
    """Ranks compare digests computed on their devices with each other and
    with start-up digests: the same bytes must give the same integers on the
    GPU as on the host (integer sums wrap the same way in any order)."""
    layer = _layer(num_slots=9)
    layer.append(torch.randint(0, 256, (9, 3 * 4096 + 5), dtype=torch.uint8))
    on_device = slot_digests([t.cuda() for t in layer], chunk_elements=9 * 4096)
    assert torch.equal(on_device.cpu(), slot_digests(layer))
