"""Skewed, drifting routing for the toy MoE in the torchrun scripts."""

from __future__ import annotations

import torch


def zipf_routing(
    step: int, phase_len: int, layers: int, experts: int, tokens: int, top_k: int
) -> torch.Tensor:
    """Top-k ids ``[layers, tokens, top_k]``, Zipf(1.5)-skewed; the hot experts
    change every ``phase_len`` steps. Deterministic in ``step``: every rank
    draws the same ids."""
    phase = step // phase_len
    ids = []
    for layer in range(layers):
        gen = torch.Generator().manual_seed(1000 * phase + layer)
        order = torch.randperm(experts, generator=gen)
        probs = torch.empty(experts)
        probs[order] = 1.0 / torch.arange(1, experts + 1, dtype=torch.float) ** 1.5
        gen.manual_seed(step * 31 + layer)
        ids.append(torch.multinomial(probs.expand(tokens, -1), top_k, generator=gen))
    return torch.stack(ids)
