"""Model geometry presets for the simulated deployment, from the real configs.

Only the MoE geometry matters to EPLB: layers, routed experts, groups, top-k and
the size of one expert. Expert matrices are shrunk by ``scale`` per dimension
so that a laptop holds them; they stay real tensors that really move.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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

    def scaled(self, scale: float, num_layers: int | None = None) -> ModelPreset:
        """This geometry with each expert dimension multiplied by ``scale``.

        ``num_layers`` keeps only the first layers, so a short run on a small
        machine still has the model's real expert count and top-k.
        """
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        layers = self.num_moe_layers if num_layers is None else num_layers
        if not 1 <= layers <= self.num_moe_layers:
            raise ValueError(
                f"layers must be in [1, {self.num_moe_layers}] for {self.name}, "
                f"got {layers}"
            )
        return dataclasses.replace(
            self,
            num_moe_layers=layers,
            hidden_size=max(1, round(self.hidden_size * scale)),
            moe_intermediate_size=max(1, round(self.moe_intermediate_size * scale)),
        )

    def expert_numel(self) -> int:
        """Elements of one expert: gate and up projections plus down projection."""
        return 3 * self.hidden_size * self.moe_intermediate_size


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        # DeepSeek-V3: 61 layers, the first 3 dense; 8 expert groups.
        ModelPreset("deepseek-v3", 58, 256, 8, 8, 7168, 2048),
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
