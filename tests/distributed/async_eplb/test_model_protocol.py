"""``EplbState`` follows vLLM's model protocol and vLLM's own API details.

- ``add_model`` calls ``set_eplb_state`` first and only then reads
  ``model.expert_weights`` (vLLM's models create it there);
- ``assert_confs_equal``/``validate_ep_configuration`` raise as vLLM's do;
- the profile step drops its load before it rearranges (vLLM 0.33);
- ``prepare_forward`` hashes a model config once, not on every forward;
- placement policies' bad-input error is both ``ValueError`` and
  ``AssertionError``.

One in-process gloo rank; vLLM is not needed except where marked.
"""

from __future__ import annotations

import pytest
import torch
from fake_vllm import model_config, parallel_config

from vllm.distributed.async_eplb.config import AsyncEplbConfig
from vllm.distributed.async_eplb.eplb_state import EpGroupInfo, EplbState
from vllm.distributed.async_eplb.model_state import ExpertGeometryMismatch
from vllm.distributed.async_eplb.rebalance_algo import (
    RebalanceArgumentError,
    rebalance_experts,
)
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

pytestmark = pytest.mark.usefixtures("one_rank_world")
LAYERS, EXPERTS, REDUNDANT = 2, 8, 2


def _state(**eplb: object) -> EplbState:
    return EplbState(
        parallel_config(num_redundant_experts=REDUNDANT, **eplb),
        "cpu",
        ep_group=EpGroupInfo.whole_world(),
        config=AsyncEplbConfig(min_gain=0.0, vote_delay=1, timeout_s=5.0),
    )


def _toy(layers: int = LAYERS, redundant: int = REDUNDANT, seed: int = 0) -> ToyMoE:
    return ToyMoE(layers, EXPERTS, redundant, 1, 0, hidden_size=4, seed=seed)


def test_add_model_reads_expert_weights_only_after_set_eplb_state() -> None:
    model = _toy()
    assert not hasattr(model, "expert_weights")  # as vLLM's models
    state = _state()
    try:
        state.add_model(model, model_config())
        for layer, weights in zip(model.moe_layers, model.expert_weights, strict=True):
            assert all(
                a is b for a, b in zip(weights, layer.get_expert_weights(), strict=True)
            )
        buffer = state.model_states["toy-hash"].buffer
        assert buffer.layout.shapes == tuple(
            tuple(w.shape[1:]) for w in model.expert_weights[0]
        )
    finally:
        state.shutdown()


def test_set_eplb_state_that_copies_the_weights_is_refused() -> None:
    """EPLB writes moved experts into ``expert_weights``: copies would leave
    the layers computing with the old ones."""

    class CopyingToy(ToyMoE):
        def set_eplb_state(self, *args: torch.Tensor) -> None:
            super().set_eplb_state(*args)
            self.expert_weights = [
                [w.clone() for w in layer] for layer in self.expert_weights
            ]

    state = _state()
    try:
        with pytest.raises(ValueError, match=r"expert_weights\[0\] are not the"):
            state.add_model(
                CopyingToy(LAYERS, EXPERTS, REDUNDANT, 1, 0), model_config()
            )
    finally:
        state.shutdown()


def test_confs_must_match_as_in_vllm() -> None:
    target, drafter = _toy(), _toy(layers=1, seed=3)
    EplbState.assert_confs_equal(target, drafter)  # layers may differ
    other = _toy(redundant=REDUNDANT + 2)
    with pytest.raises(
        RuntimeError, match=r"num_redundant_experts 4 \(registered: 2\)"
    ):
        EplbState.assert_confs_equal(target, other)
    state = _state()
    try:
        state.validate_ep_configuration(other)  # nothing registered yet
        state.add_model(target, model_config("target"))
        state.validate_ep_configuration(drafter)
        with pytest.raises(ExpertGeometryMismatch) as raised:
            state.validate_ep_configuration(other)
        assert isinstance(raised.value, ValueError)
        with pytest.raises(RuntimeError, match="num_physical_experts 12"):
            state.add_model(other, model_config("other"))
        assert list(state.model_states) == ["target-hash"]
    finally:
        state.shutdown()


def test_profile_step_load_never_enters_the_window() -> None:
    model = _toy()
    state = _state(window_size=4, step_interval=1000)
    try:
        state.add_model(model, model_config())
        ms = state.model_states["toy-hash"]
        ms.expert_load_pass.fill_(7)  # what the profile forward recorded
        state.step(is_dummy=True, is_profile=True)
        assert int(ms.expert_load_pass.sum()) == 0
        ms.expert_load_pass[:, 0] = 1  # one real token per layer
        state.step()
        assert int(ms.window.total().sum()) == LAYERS
    finally:
        state.shutdown()


def test_prepare_forward_hashes_each_config_once() -> None:
    model, config = _toy(), model_config()
    state = _state()
    try:
        state.add_model(model, config)
        for tokens in range(1, 50):
            state.prepare_forward(config, tokens)
        assert config.hash_calls <= 2  # add_model, then the first forward
        assert int(state.model_states["toy-hash"].num_unpadded_tokens_tensors[0]) == 49
        unknown = model_config("unregistered")
        state.prepare_forward(unknown, 5)  # vLLM's runner may pass a dense model's
    finally:
        state.shutdown()


@pytest.mark.parametrize("catch", [ValueError, AssertionError])
def test_policy_bad_input_is_both_value_and_assertion_error(catch: type) -> None:
    weight = torch.ones(1, 4)
    with pytest.raises(catch, match="num_replicas=7 is not divisible by num_ranks=4"):
        rebalance_experts(weight, 7, 2, 2, 4)
    assert issubclass(RebalanceArgumentError, catch)


@pytest.mark.vllm
def test_toy_set_eplb_state_is_vllms() -> None:
    """vLLM's own ``MixtureOfExperts.set_eplb_state`` leaves a ``ToyMoE`` in
    the state ours does: the toy follows the protocol, not our code."""
    interfaces = pytest.importorskip("vllm.model_executor.models.interfaces")
    ours, theirs = _toy(), _toy()
    tensors = [
        torch.zeros(LAYERS, EXPERTS + REDUNDANT, dtype=torch.int32),
        torch.full((LAYERS, EXPERTS, REDUNDANT + 1), -1),
        torch.ones(LAYERS, EXPERTS, dtype=torch.int64),
    ]
    ours.set_eplb_state(*tensors)
    interfaces.MixtureOfExperts.set_eplb_state(theirs, *tensors)
    assert isinstance(ours, interfaces.MixtureOfExperts)
    for a, b in zip(ours.moe_layers, theirs.moe_layers, strict=True):
        for name in ("expert_load_view", "logical_to_physical_map"):
            assert getattr(a, name).data_ptr() == getattr(b, name).data_ptr()
    # The same storage (vLLM 0.33 hands 1-byte dtypes over as uint8 views).
    for model in (ours, theirs):
        assert all(
            x.data_ptr() == y.data_ptr() and x.nbytes == y.nbytes
            for layer, weights in zip(
                model.moe_layers, model.expert_weights, strict=True
            )
            for x, y in zip(weights, layer.get_expert_weights(), strict=True)
        )
