"""vLLM's balancedness log line, from a vote of every rank's tokens.

Each rank's tokens per EP rank are read from the step's load before it is
recorded, summed over ranks by a non-blocking vote, and logged by EP rank 0
when the vote is read, with vLLM's wording so log readers keep working.
"""

from __future__ import annotations

import logging

import torch

from vllm.distributed.async_eplb.agreement import VoteResult
from vllm.distributed.async_eplb.eplb_parts import EplbParts, split_flat
from vllm.distributed.async_eplb.load_stats import balancedness, tokens_per_rank

__all__ = ["BalanceLog"]

logger = logging.getLogger(__name__)


class BalanceLog:
    """Launches the log votes and logs their sums."""

    def __init__(self, parts: EplbParts, step_interval: int) -> None:
        self.parts = parts
        self.step_interval = step_interval

    def rank_tokens(self) -> list[torch.Tensor]:
        """This step's tokens per EP rank, per model (before the load is reset)."""
        world = self.parts.ep.world_size
        return [
            tokens_per_rank(s.expert_load_pass.to("cpu", torch.int64), world)
            for s in self.parts.states
        ]

    def launch(
        self, step: int, rearrangement_step: int, rank_tokens: list[torch.Tensor]
    ) -> None:
        payload = torch.cat([t.reshape(-1) for t in rank_tokens])
        context = (rearrangement_step, [t.shape for t in rank_tokens])
        self.parts.vote.launch(step, "log", payload, context)

    def on_vote(self, result: VoteResult) -> None:
        rearrangement_step, shapes = result.context
        remaining = max(0, self.step_interval - rearrangement_step)
        parts = self.parts
        for state, rank_tokens in zip(
            parts.states, split_flat(result.total, shapes), strict=True
        ):
            try:
                avg, peak, value = balancedness(rank_tokens)
            except ValueError as exc:  # bad load from the router: say so, go on
                logger.warning("async EPLB: not logging balancedness: %s", exc)
                continue
            parts.counters.last_balancedness = value
            if parts.ep.rank == 0:
                logger.info(
                    "EPLB step: %d for model %s: avg_tokens=%.2f, "
                    "max_tokens=%d, balancedness=%.4f, "
                    "steps until the next rearrangement: %d",
                    rearrangement_step,
                    state.model_name,
                    avg,
                    int(peak),
                    value,
                    remaining,
                )
