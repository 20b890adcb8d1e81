"""Bad input is refused with an error naming the value, and changes nothing.

Where the input enters through ``EplbState`` (a model, a load recorded by the
router, the knobs) it is tested there, on one in-process gloo rank; the pure
functions directly otherwise. Every case snapshots the model's weights and the
maps before and checks them after.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_vllm import parallel_config

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.load_stats import LoadWindow, fold_to_logical
from vllm.distributed.async_eplb.maps import ExpertMaps, validate_placement
from vllm.distributed.async_eplb.rebalance_algo import rebalance_experts
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE
from vllm.distributed.async_eplb.transports import make_transport

LAYERS, EXPERTS, REDUNDANT = 2, 8, 2
MODEL_CONFIG = SimpleNamespace(model="toy", compute_hash=lambda: "toy-hash")


pytestmark = pytest.mark.usefixtures("one_rank_world")


def _parallel_config(**eplb: object) -> SimpleNamespace:
    return parallel_config(**{"num_redundant_experts": REDUNDANT, **eplb})


def _state(**eplb: object) -> EplbState:
    config = AsyncEplbConfig(min_gain=0.0, vote_delay=1, timeout_s=5.0)
    group = EpGroupInfo.whole_world()
    return EplbState(_parallel_config(**eplb), "cpu", ep_group=group, config=config)


def _model() -> ToyMoE:
    return ToyMoE(LAYERS, EXPERTS, REDUNDANT, 1, 0, hidden_size=4)


def _weights(model: ToyMoE) -> list[list[torch.Tensor]]:
    """A copy of every layer's own weights (no ``expert_weights`` before
    ``set_eplb_state``, as in vLLM)."""
    return [
        [w.clone() for w in layer.get_expert_weights()] for layer in model.moe_layers
    ]


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(
        torch.equal(x, y)
        for la, lb in zip(a, b, strict=True)
        for x, y in zip(la, lb, strict=True)
    )


# ---- models that EplbState.add_model must refuse -------------------------------


def _bad_models() -> list[tuple[str, object, str]]:
    no_moe = SimpleNamespace(num_moe_layers=0)
    dense = SimpleNamespace()  # a model that is not MixtureOfExperts at all
    wrong_dtype = _model()
    wrong_dtype.moe_layers[1].weights[0] = wrong_dtype.moe_layers[1].weights[0].double()
    wrong_slots = _model()
    wrong_slots.moe_layers[0].weights = [
        w[:-1] for w in wrong_slots.moe_layers[0].weights
    ]
    missing_layer = _model()
    missing_layer.moe_layers = missing_layer.moe_layers[:1]
    too_many_redundant = _model()
    too_many_redundant.num_redundant_experts = REDUNDANT + 1
    not_divisible = ToyMoE(LAYERS, EXPERTS, REDUNDANT + 1, 1, 0, hidden_size=4)
    return [
        ("no MoE layers", no_moe, "num_moe_layers=0"),
        ("dense model", dense, "has no MoE layers"),
        ("wrong dtype", wrong_dtype, "torch.float64"),
        ("wrong slot count", wrong_slots, "hold 9 slots, expected 10"),
        ("missing layer weights", missing_layer, "2 MoE layers but 1 in moe_layers"),
        ("more redundant than the maps allow", too_many_redundant, "3 redundant"),
        ("redundant != config", not_divisible, "num_redundant_experts is 2"),
    ]


@pytest.mark.parametrize(
    "model, message",
    [(m, msg) for _, m, msg in _bad_models()],
    ids=[name for name, _, _ in _bad_models()],
)
def test_add_model_refuses_and_changes_nothing(model: object, message: str) -> None:
    state = _state()
    weights = _weights(model) if hasattr(model, "moe_layers") else None
    with pytest.raises(ValueError, match=message):
        state.add_model(model, MODEL_CONFIG)
    assert state.model_states == {}
    # Left as it was found: never wired up, no expert_weights created.
    assert not hasattr(model, "expert_weights")
    for layer in getattr(model, "moe_layers", ()):
        assert layer.expert_load_view is None
    if weights is not None:
        assert _same(weights, _weights(model))
    state.shutdown()


def test_slots_not_divisible_by_ranks_is_refused() -> None:
    state = EplbState(
        _parallel_config(),
        "cpu",
        ep_group=EpGroupInfo(0, (0, 1, 2), ((0, 1, 2),), 3),
        config=AsyncEplbConfig(),
    )
    model = _model()  # 10 physical experts on 3 ranks
    with pytest.raises(ValueError, match="10 physical experts are not divisible by 3"):
        state.add_model(model, MODEL_CONFIG)
    assert state.model_states == {}
    state.shutdown()


# ---- load recorded by the router ---------------------------------------------


def test_negative_router_load_aborts_the_rebalance_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = _state()
    model = _model()
    state.add_model(model, MODEL_CONFIG)
    state.start_async_loop()
    ms = state.model_states["toy-hash"]
    weights, maps = _weights(model), copy.deepcopy(vars(ms.maps))
    ids = torch.zeros(LAYERS, 4, 2, dtype=torch.int64)
    with caplog.at_level(logging.ERROR):
        for step in range(12):
            model.forward(ids)
            if step == 0:
                model.moe_layers[1].expert_load_view[3] = -5  # a corrupted count
            state.step(log_stats=True)
    assert state.counters.aborts >= 1
    assert "weight[1, 3] = -5.0" in state.counters.last_abort_cause
    assert "weight[1, 3] = -5.0" in caplog.text
    assert _same(weights, _weights(model))
    assert all(torch.equal(maps[k], v) for k, v in vars(ms.maps).items())
    state.shutdown()


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_policy_refuses_non_finite_or_negative_load(bad: float) -> None:
    load = torch.ones(LAYERS, EXPERTS)
    load[1, 2] = bad
    old = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS).expand(LAYERS, -1)
    before = old.clone()
    with pytest.raises(ValueError, match=rf"weight\[1, 2\] = {bad}"):
        rebalance_experts(load, EXPERTS + REDUNDANT, 1, 1, 2, old)
    assert torch.equal(old, before)


@pytest.mark.parametrize("bad", [float("nan"), -3.0])
def test_load_fold_refuses_nan_and_negative(bad: float) -> None:
    phy2log = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS).expand(LAYERS, -1)
    load = torch.ones(LAYERS, EXPERTS + REDUNDANT)
    load[0, 1] = bad
    with pytest.raises(ValueError, match=r"NaN|negative"):
        fold_to_logical(load, phy2log, EXPERTS)


def test_wrong_shapes_and_dtypes_are_refused() -> None:
    phy2log = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS).expand(LAYERS, -1)
    window = LoadWindow(4, phy2log, EXPERTS)
    with pytest.raises(ValueError, match=r"load of shape \(2, 9\)"):
        window.record(torch.ones(LAYERS, EXPERTS + REDUNDANT - 1))
    assert window.num_recorded == 0
    with pytest.raises(ValueError, match=r"shape \[L, E\], got \(8,\)"):
        rebalance_experts(torch.ones(EXPERTS), EXPERTS, 1, 1, 1)
    with pytest.raises(ValueError, match=r"torch\.bool"):
        rebalance_experts(torch.ones(LAYERS, EXPERTS, dtype=torch.bool), 8, 1, 1, 1)
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        validate_placement(phy2log.float(), EXPERTS)


# ---- placements ------------------------------------------------------------


def _maps() -> ExpertMaps:
    row = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS)
    return ExpertMaps(row.expand(LAYERS, -1), EXPERTS, REDUNDANT + 1)


def _snapshot(maps: ExpertMaps) -> list[torch.Tensor]:
    return [maps.phy2log.clone(), maps.log2phy.clone(), maps.logcnt.clone()]


def test_placement_with_an_expert_without_replica_is_refused() -> None:
    maps = _maps()
    before = _snapshot(maps)
    row = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS)
    row[5] = 4  # expert 5 loses its only replica
    with pytest.raises(ValueError, match="logical expert 5 has no physical replica"):
        maps.commit_layer(1, row)
    with pytest.raises(ValueError, match="logical expert 5 has no physical replica"):
        maps.prepare_layer(row)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(maps), strict=True))


def test_placement_with_more_replicas_than_the_maps_allow_is_refused() -> None:
    row = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS)
    maps = ExpertMaps(row.expand(LAYERS, -1), EXPERTS, 2)  # at most 2 replicas
    before = _snapshot(maps)
    hot = row.clone()
    hot[EXPERTS:] = 0  # expert 0 on 3 slots
    with pytest.raises(ValueError, match="3 replicas, more than the 2"):
        maps.commit_layer(0, hot)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(maps), strict=True))


def test_slots_not_divisible_by_ranks_in_a_placement() -> None:
    row = torch.arange(EXPERTS + REDUNDANT).remainder(EXPERTS)
    with pytest.raises(ValueError, match="10 physical slots are not divisible by 4"):
        validate_placement(row, EXPERTS, num_ranks=4)
    with pytest.raises(ValueError, match="num_replicas=10 is not divisible"):
        rebalance_experts(np.ones((LAYERS, EXPERTS)), 10, 1, 1, 4)


# ---- names and knobs ---------------------------------------------------------


def test_unknown_policy_and_transport_names() -> None:
    with pytest.raises(ValueError, match="'greedy'"):
        AsyncEplbConfig(policy="greedy")
    with pytest.raises(ValueError, match="'nccl-magic'"):
        AsyncEplbConfig(transport="nccl-magic")
    with pytest.raises(ValueError, match="'greedy'"):
        rebalance_experts(torch.ones(1, 4), 4, 1, 1, 1, policy="greedy")
    with pytest.raises(ValueError, match="'tcp'"):
        make_transport("tcp", backend=None, group=None)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("VLLM_ASYNC_EPLB_POLICY", "fastest", "'fastest'"),
        ("VLLM_ASYNC_EPLB_TRANSPORT", "rdma", "'rdma'"),
        ("VLLM_ASYNC_EPLB_LAYERS_PER_STEP", "0", "LAYERS_PER_STEP='0'"),
        ("VLLM_ASYNC_EPLB_LAYERS_PER_STEP", "two", "LAYERS_PER_STEP='two'"),
        ("VLLM_ASYNC_EPLB_MIN_GAIN", "nan", "MIN_GAIN='nan'"),
        ("VLLM_ASYNC_EPLB_MIN_GAIN", "1.5", "MIN_GAIN=1.5"),
        ("VLLM_ASYNC_EPLB_VOTE_DELAY", "-1", "VOTE_DELAY='-1'"),
        ("VLLM_ASYNC_EPLB_TIMEOUT_S", "0", "TIMEOUT_S='0'"),
        ("VLLM_ASYNC_EPLB_TIMEOUT_S", "inf", "TIMEOUT_S='inf'"),
    ],
)
def test_invalid_environment_knobs_fail_at_start_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        EplbState(_parallel_config(), "cpu", ep_group=EpGroupInfo.whole_world())


@pytest.mark.parametrize(
    "field, value", [("window_size", 0), ("step_interval", -3), ("step_interval", 2.5)]
)
def test_invalid_eplb_config_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        _state(**{field: value})
