"""Model geometry presets for the simulated deployment, from the real configs.

Only the MoE geometry matters to EPLB: layers, routed experts, groups, top-k and
the size of one expert. Experts are shrunk to ``scale`` of their real number of
elements so that a laptop holds them; they stay real tensors that really move,
with the real checkpoint's bytes per element (FP8: 1, BF16: 2), so a toy expert
is ``scale`` of a real one in bytes too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

__all__ = ["PRESETS", "ModelPreset", "get_preset"]


@dataclass(frozen=True)
class ModelPreset:
    """MoE geometry of one model; expert sizes are the unscaled real ones."""

    name: str
    num_moe_layers: int
    num_routed_experts: int
    num_expert_groups: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    weight_bytes: int = 2
    """Bytes per expert weight element in the released checkpoint."""

    def with_layers(self, num_layers: int | None) -> ModelPreset:
        """The first ``num_layers`` MoE layers (all when None).

        A short run on a small machine keeps the model's real expert count,
        groups and top-k; only the depth shrinks.
        """
        if num_layers is None:
            return self
        if not 1 <= num_layers <= self.num_moe_layers:
            raise ValueError(
                f"layers must be in [1, {self.num_moe_layers}] for {self.name}, "
                f"got {num_layers}"
            )
        return dataclasses.replace(self, num_moe_layers=num_layers)

    @property
    def expert_params(self) -> int:
        """Elements of one real expert: gate and up projections plus down."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def toy_dtype(self) -> torch.dtype:
        """The toy's weight dtype, as wide as the checkpoint's (its integer
        weights are exact in both): int8 stands in for FP8, whose CPU
        conversion to fp32 is ten times slower."""
        return {1: torch.int8, 2: torch.bfloat16}[self.weight_bytes]

    def toy_hidden_size(self, scale: float) -> int:
        """Side H of a toy expert (an H x H matrix) holding ``scale`` of the
        real expert's elements: the bytes that move shrink by ``scale``."""
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        return max(4, round(math.sqrt(scale * self.expert_params)))


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        # DeepSeek-V3: 61 layers, the first 3 dense; 8 expert groups; FP8.
        ModelPreset("deepseek-v3", 58, 256, 8, 8, 7168, 2048, weight_bytes=1),
        # DeepSeek-V2-Lite: 27 layers, the first dense. Matches the shipped
        # ESFT routing trace (26 x 64, top-6), replayed by default.
        ModelPreset("deepseek-v2-lite", 26, 64, 1, 6, 2048, 1408),
        ModelPreset("qwen3-30b-a3b", 48, 128, 1, 8, 2048, 768),
        ModelPreset("mixtral-8x7b", 32, 8, 1, 2, 4096, 14336),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; ValueError naming it and the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}") from None
