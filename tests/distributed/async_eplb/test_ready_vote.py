"""The ready vote's codec and the staging groups' bookkeeping (pure)."""

from __future__ import annotations

import pytest
import torch

from vllm.distributed.async_eplb.ready_vote import (
    ReadyReport,
    decode_ready,
    encode_ready,
)
from vllm.distributed.async_eplb.staging_groups import StagingGroups

LAYERS = (3, 2)  # two models: a target and a drafter


def _report(**kw: object) -> ReadyReport:
    fields = dict(error=False, planned=True, skip=False, dead=False, staged=((), ()))
    fields.update(kw)
    return ReadyReport(**fields)  # type: ignore[arg-type]


def test_layout_is_flags_then_each_models_layers() -> None:
    payload = encode_ready(_report(error=True, staged=((0, 2), (1,))), LAYERS)
    assert payload == [1, 1, 0, 0, 1, 0, 1, 0, 1]


def test_sum_over_ranks_decodes_to_counts_and_layers_staged_everywhere() -> None:
    ranks = [
        _report(staged=((0, 2), (1,))),
        _report(skip=True, staged=((2,), (0, 1))),
        _report(planned=False, dead=True, staged=((0, 2), ())),
    ]
    total = torch.tensor([encode_ready(r, LAYERS) for r in ranks]).sum(0)
    tally = decode_ready(total, LAYERS)
    assert (tally.errors, tally.planned, tally.skips, tally.dead) == (0, 2, 1, 1)
    assert tally.staged_counts == ((2, 0, 3), (1, 2))
    assert tally.staged_everywhere(0, 3) == [2]
    assert tally.staged_everywhere(1, 3) == []
    assert tally.staged_everywhere(1, 2) == [1]


def test_round_trip_of_one_rank_is_itself() -> None:
    report = _report(staged=((1,), (0, 1)))
    tally = decode_ready(encode_ready(report, LAYERS), LAYERS)
    assert tally.staged_counts == ((0, 1, 0), (1, 1))
    assert (tally.errors, tally.planned, tally.skips, tally.dead) == (0, 1, 0, 0)


@pytest.mark.parametrize(
    ("staged", "match"),
    [(((3,), ()), "staged layer 3 is outside"), (((),), "covers 1 models")],
)
def test_encode_refuses_a_layer_or_model_count_that_does_not_fit(
    staged: tuple, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode_ready(_report(staged=staged), LAYERS)


def test_decode_refuses_a_payload_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="has 8 entries, expected 9"):
        decode_ready([0] * 8, LAYERS)


def test_groups_replace_retires_current_until_no_spare_is_left() -> None:
    made = iter(["a", "b", "c"])
    groups = StagingGroups.create(lambda: next(made), spares=2)
    assert (groups.current, groups.spares_left) == ("a", 2)
    assert groups.replace() and groups.current == "b"
    assert groups.replace() and groups.current == "c"
    assert not groups.replace() and groups.current == "c"
    assert groups.release(keep_in_use=False) == ["c", "a", "b"]
    assert groups.current is None and groups.release(keep_in_use=False) == []


def test_groups_release_keeps_those_a_thread_may_wait_on() -> None:
    groups = StagingGroups("a", ["b", None])
    groups.replace()
    # "b" is in use and "a" retired: only the unused spare could go, but it
    # stands for a single rank (None), so nothing is destroyed.
    assert groups.release(keep_in_use=True) == []


def test_groups_refuse_a_negative_spare_count() -> None:
    with pytest.raises(ValueError, match="spares must be >= 0, got -1"):
        StagingGroups.create(lambda: None, spares=-1)
