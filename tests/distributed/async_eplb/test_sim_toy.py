"""The toy model's batched forward and per-layer verification stay exact.

``ToyMoE.forward`` computes a rank's slots with one matmul per used slot, and
verification combines every expert's output computed once per layer; both must
equal the straightforward reference bit for bit, and a misplaced expert must
still show as a mismatch. One process, one rank: no process group needed.
"""

from __future__ import annotations

import pytest
import torch

from vllm.distributed.async_eplb.maps import compute_logical_maps
from vllm.distributed.async_eplb.simulation.toy_moe import ToyMoE

LAYERS, EXPERTS, REDUNDANT, HIDDEN, TOP_K, TOKENS = 3, 12, 4, 8, 3, 40


def _routing(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A skewed draw, so some experts get many tokens and some none.
    probs = torch.rand(EXPERTS, generator=gen) ** 4 + 1e-3
    return torch.stack(
        [
            torch.stack(
                [torch.multinomial(probs, TOP_K, generator=gen) for _ in range(TOKENS)]
            )
            for _ in range(LAYERS)
        ]
    )


def _placed_toy(dtype: torch.dtype, seed: int) -> ToyMoE:
    """A one-rank toy whose slots hold a shuffled placement with replicas,
    its weights and maps set to match."""
    gen = torch.Generator().manual_seed(seed)
    model = ToyMoE(
        LAYERS, EXPERTS, REDUNDANT, 1, 0, hidden_size=HIDDEN, top_k=TOP_K, dtype=dtype
    )
    slots = EXPERTS + REDUNDANT
    phy2log = torch.stack(
        [
            torch.cat(
                [
                    torch.arange(EXPERTS),
                    torch.randint(EXPERTS, (REDUNDANT,), generator=gen),
                ]
            )[torch.randperm(slots, generator=gen)]
            for _ in range(LAYERS)
        ]
    )
    for index, (layer, row) in enumerate(zip(model.moe_layers, phy2log, strict=True)):
        placed = model._stack(index, row.tolist())
        for dst, src in zip(layer.weights, placed, strict=True):
            dst.copy_(src)
    log2phy, logcnt = compute_logical_maps(phy2log, EXPERTS)
    model.set_eplb_state(torch.zeros(LAYERS, slots, dtype=torch.int64), log2phy, logcnt)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("seed", range(3))
def test_forward_on_a_shuffled_placement_equals_the_reference(dtype, seed) -> None:
    model = _placed_toy(dtype, seed)
    ids = _routing(seed)
    out = model.forward(ids)
    assert torch.equal(out, model.reference_forward(ids))
    # The load the forward recorded is one per (token, k), on the slots used.
    assert sum(int(layer.expert_load_view.sum()) for layer in model.moe_layers) == (
        LAYERS * TOKENS * TOP_K
    )


def test_a_misplaced_expert_is_a_mismatch() -> None:
    model = _placed_toy(torch.int8, 0)
    ids = _routing(0)
    layer = model.moe_layers[1]
    used = int(layer.logical_to_physical_map[ids[1, 0, 0], 0])
    pair = torch.tensor([used, (used + 1) % (EXPERTS + REDUNDANT)])
    for w in layer.weights:  # swap two slots' weights, maps unchanged
        w[pair] = w[pair.flip(0)]
    out = model.forward(ids)
    reference = model.reference_forward(ids)
    assert torch.equal(out[0], reference[0])
    assert not torch.equal(out[1], reference[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_expert_outputs_combined_equal_the_reference_layer(dtype) -> None:
    model = ToyMoE(
        LAYERS, EXPERTS, REDUNDANT, 1, 0, hidden_size=HIDDEN, top_k=TOP_K, dtype=dtype
    )
    hidden = model.hidden_states(TOKENS)
    for seed in range(4):
        ids = _routing(seed)
        gates = model.default_gates(ids[0])
        for layer in range(LAYERS):
            weights = model.reference_weights(layer)
            outputs = model.reference_expert_outputs(weights, hidden)
            assert outputs.shape == (EXPERTS, TOKENS, HIDDEN)
            combined = model.combine_expert_outputs(outputs, ids[layer], gates)
            expected = model.reference_layer_forward(weights, ids[layer], hidden, gates)
            # Bit for bit, zeros' signs included.
            assert torch.equal(combined.view(torch.int32), expected.view(torch.int32))
