"""Expert maps: derivation against a direct loop, validation errors, in-place commit."""

import pytest
import torch

from vllm.distributed.async_eplb.maps import (
    ExpertMaps,
    derive_logical_maps,
    max_replicas_for,
    validate_placement,
)


def reference_logical_maps(phy2log, num_logical, max_replicas):
    num_layers, num_physical = phy2log.shape
    log2phy = torch.full((num_layers, num_logical, max_replicas), -1, dtype=torch.int64)
    logcnt = torch.zeros((num_layers, num_logical), dtype=torch.int64)
    for layer in range(num_layers):
        for slot in range(num_physical):
            expert = int(phy2log[layer, slot])
            log2phy[layer, expert, logcnt[layer, expert]] = slot
            logcnt[layer, expert] += 1
    return log2phy, logcnt


def random_placement(gen, num_layers, num_logical, num_physical):
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(
            0, num_logical, (num_physical - num_logical,), generator=gen
        )
        row = torch.cat([torch.arange(num_logical), extra])
        rows.append(row[torch.randperm(num_physical, generator=gen)])
    return torch.stack(rows)


@pytest.mark.parametrize("seed", range(20))
def test_derive_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    num_logical = int(torch.randint(1, 40, (1,), generator=gen))
    num_physical = num_logical + int(torch.randint(0, 20, (1,), generator=gen))
    phy2log = random_placement(gen, 3, num_logical, num_physical)
    max_replicas = num_physical - num_logical + 1
    log2phy, logcnt = derive_logical_maps(phy2log, num_logical, max_replicas)
    ref_log2phy, ref_logcnt = reference_logical_maps(phy2log, num_logical, max_replicas)
    assert torch.equal(log2phy, ref_log2phy)
    assert torch.equal(logcnt, ref_logcnt)
    one_log2phy, one_logcnt = derive_logical_maps(phy2log[1], num_logical, max_replicas)
    assert torch.equal(one_log2phy, ref_log2phy[1])
    assert torch.equal(one_logcnt, ref_logcnt[1])


def test_max_replicas_for():
    assert max_replicas_for(0) == 1
    assert max_replicas_for(32) == 33
    with pytest.raises(ValueError, match="-1"):
        max_replicas_for(-1)


@pytest.mark.parametrize(
    ("phy2log", "num_logical", "num_ranks", "max_replicas", "message"),
    [
        (torch.tensor([[0, 1, 2, 5]]), 4, None, None, r"phy2log\[0, 3\] = 5"),
        (torch.tensor([[0, 1, -1, 2]]), 4, None, None, r"phy2log\[0, 2\] = -1"),
        (torch.tensor([[0, 1, 1, 2]]), 4, None, None, "logical expert 3 has no"),
        (torch.tensor([[0, 1, 2, 3, 0, 0]]), 4, 4, None, "6 physical slots.*4 ranks"),
        (torch.tensor([[0, 1, 2, 0, 0, 0]]), 3, None, 2, "expert 0 .* 4 replicas"),
        (torch.tensor([[0.0, 1.0]]), 2, None, None, "dtype torch.float32"),
        (torch.zeros(1, 2, 3, dtype=torch.int64), 2, None, None, "shape"),
        (torch.tensor([[0, 1]]), 3, None, None, "2 physical slots cannot hold 3"),
    ],
)
def test_validation_names_bad_value(
    phy2log, num_logical, num_ranks, max_replicas, message
):
    with pytest.raises(ValueError, match=message):
        validate_placement(phy2log, num_logical, num_ranks, max_replicas)


def test_commit_layer_in_place_keeps_storage():
    gen = torch.Generator().manual_seed(0)
    maps = ExpertMaps(random_placement(gen, 4, 8, 12), 8, 5)
    pointers = [t.data_ptr() for t in (maps.phy2log, maps.log2phy, maps.logcnt)]
    untouched = maps.log2phy[[0, 1, 3]].clone()
    new_row = random_placement(gen, 1, 8, 12)[0]
    maps.commit_layer(2, new_row)
    assert [t.data_ptr() for t in (maps.phy2log, maps.log2phy, maps.logcnt)] == pointers
    ref_log2phy, ref_logcnt = reference_logical_maps(new_row[None], 8, 5)
    assert torch.equal(maps.phy2log[2], new_row)
    assert torch.equal(maps.log2phy[2], ref_log2phy[0])
    assert torch.equal(maps.logcnt[2], ref_logcnt[0])
    assert torch.equal(maps.log2phy[[0, 1, 3]], untouched)


def test_bad_commit_changes_nothing():
    gen = torch.Generator().manual_seed(1)
    maps = ExpertMaps(random_placement(gen, 2, 4, 6), 4, 3)
    before = [t.clone() for t in (maps.phy2log, maps.log2phy, maps.logcnt)]
    with pytest.raises(ValueError, match="logical expert 3 has no"):
        maps.commit_layer(0, torch.tensor([0, 1, 2, 2, 1, 0]))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        maps.commit_layer(2, torch.tensor([0, 1, 2, 3, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        maps.commit_layer(0, torch.tensor([0, 1, 2, 3]))
    for old, new in zip(before, (maps.phy2log, maps.log2phy, maps.logcnt), strict=True):
        assert torch.equal(old, new)


def test_prepared_commit_equals_direct_commit():
    gen = torch.Generator().manual_seed(2)
    old = random_placement(gen, 3, 6, 10)
    direct, prepared = ExpertMaps(old, 6, 5), ExpertMaps(old, 6, 5)
    new_row = random_placement(gen, 1, 6, 10)[0]
    direct.commit_layer(1, new_row)
    layer_maps = prepared.prepare_layer(new_row)
    pointer = prepared.log2phy.data_ptr()
    prepared.commit_prepared(1, layer_maps)
    assert prepared.log2phy.data_ptr() == pointer
    for a, b in zip(
        (direct.phy2log, direct.log2phy, direct.logcnt),
        (prepared.phy2log, prepared.log2phy, prepared.logcnt),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_prepare_rejects_bad_rows_without_touching_maps():
    gen = torch.Generator().manual_seed(3)
    maps = ExpertMaps(random_placement(gen, 2, 4, 6), 4, 3)
    before = maps.log2phy.clone()
    with pytest.raises(ValueError, match="logical expert 3 has no"):
        maps.prepare_layer(torch.tensor([0, 1, 2, 2, 1, 0]))
    with pytest.raises(ValueError, match="shape"):
        maps.prepare_layer(torch.tensor([0, 1, 2, 3]))
    assert torch.equal(maps.log2phy, before)


def test_compute_logical_maps_skips_unused_slots_like_vllm() -> None:
    """vLLM pads capacity with -1 slots; its ``compute_logical_maps`` skips
    them and sizes K by the most replicas any expert has."""
    from vllm.distributed.async_eplb.maps import UNUSED_SLOT, compute_logical_maps

    u = UNUSED_SLOT
    phy2log = torch.tensor([[2, u, 0, 2, u, 1], [u, 1, 1, 0, 2, u]])
    log2phy, logcnt = compute_logical_maps(phy2log, 3)
    assert logcnt.tolist() == [[1, 1, 2], [1, 2, 1]]
    assert log2phy.tolist() == [
        [[2, -1], [5, -1], [0, 3]],
        [[3, -1], [1, 2], [4, -1]],
    ]
    with pytest.raises(ValueError, match=r"phy2log\[0, 1\] = -2"):
        compute_logical_maps(torch.tensor([[0, -2, 1]]), 2)
    with pytest.raises(ValueError, match="-1 is not a logical expert id"):
        derive_logical_maps(phy2log, 3, 2)  # ExpertMaps never hold unused slots
