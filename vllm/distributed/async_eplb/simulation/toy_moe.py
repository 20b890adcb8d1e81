"""A small expert-parallel MoE model with real weights, for tests and benchmarks.

``ToyMoE`` follows vLLM's ``MixtureOfExperts`` protocol to the letter without
importing vLLM, so ``EplbState`` drives it exactly as it drives a served model,
on CPU ranks under ``torchrun``: like vLLM's models, it has no
``expert_weights`` until ``set_eplb_state`` builds them from each layer's
``get_expert_weights()``, and the maps and load view reach the layers only
(``moe_layers[i].logical_to_physical_map``, ...), not the model. A test with
vLLM installed checks that vLLM's own ``MixtureOfExperts.set_eplb_state``
leaves a ``ToyMoE`` in the same state as ours.

Why its arithmetic is exact: hidden states, weights, biases and scales are small
integers and gates are multiples of 1/8, so every product and sum is exactly
representable in fp32 whatever the summation order or the batch composition.
The output of a step therefore equals, bit for bit, the output of the same model
with its original placement (``reference_forward``) whenever the weights in
every physical slot really are the weights of the logical expert the maps say;
any weight moved wrongly or committed early or late shows up as a mismatch.

How to drive it (one process per EP rank, ``torch.distributed`` initialised)::

    model = ToyMoE(num_layers=3, num_logical_experts=16, num_redundant_experts=4,
                   num_ranks=4, rank=r, hidden_size=16, top_k=2)
    eplb_state.add_model(model, model_config)     # calls model.set_eplb_state
    ids = ...   # [num_layers, num_tokens, top_k] logical expert ids, same on all ranks
    out = model.forward(ids)                       # [num_layers, num_tokens, hidden]
    assert torch.equal(out, model.reference_forward(ids))
    eplb_state.step()

Every rank passes the same global batch. Each rank records in its layers'
``expert_load_view`` (per physical slot, like vLLM's router) only its share of
the tokens (token ``t`` belongs to rank ``t % num_ranks``), so the sum of the
ranks' records is the true global load. Each (token, k) is computed on the rank
holding the chosen replica; the others contribute exact zeros and an
all-reduce SUM over ``group`` combines them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["ToyMoE", "ToyMoELayer"]

_WEIGHT_RANGE = 2  # weights and hidden states are integers in [-2, 2]
_GATE_DENOMINATOR = 8  # gates are multiples of 1/8


class ToyMoELayer:
    """One MoE layer: what vLLM's ``moe_layers`` entries expose to EPLB."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        self.weights = weights
        self.expert_load_view: torch.Tensor | None = None
        self.logical_to_physical_map: torch.Tensor | None = None
        self.logical_replica_count: torch.Tensor | None = None

    def get_expert_weights(self) -> list[torch.Tensor]:
        return self.weights

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        self.expert_load_view = expert_load_view[moe_layer_idx]
        self.logical_to_physical_map = logical_to_physical_map[moe_layer_idx]
        self.logical_replica_count = logical_replica_count[moe_layer_idx]


class ToyMoE:
    """Expert-parallel MoE stand-in; see the module docstring for how to drive it.

    Each expert has three tensors, as a quantised model would: ``w [H, H]`` in
    ``dtype``, ``bias [H]`` in ``dtype`` and ``scale [H]`` in ``uint8`` (like FP8
    scales stored as bytes). Expert ``e`` of layer ``l`` computes
    ``(x @ w + bias) * scale`` in fp32. Initial placement is vLLM's: slot ``p``
    holds logical expert ``p`` for ``p < E``, then ``p % E`` for the redundant slots.
    """

    expert_weights: list[list[torch.Tensor]]
    """Created by :meth:`set_eplb_state`, as in vLLM's models."""

    def __init__(
        self,
        num_layers: int,
        num_logical_experts: int,
        num_redundant_experts: int,
        num_ranks: int,
        rank: int,
        hidden_size: int = 16,
        top_k: int = 2,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        num_physical = num_logical_experts + num_redundant_experts
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        if num_logical_experts <= 0:
            raise ValueError(
                f"num_logical_experts must be > 0, got {num_logical_experts}"
            )
        if num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts must be >= 0, got {num_redundant_experts}"
            )
        if num_ranks <= 0 or num_physical % num_ranks != 0:
            raise ValueError(
                f"{num_physical} physical experts are not divisible by "
                f"num_ranks={num_ranks}"
            )
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is out of range [0, {num_ranks})")
        if not 0 < top_k <= num_logical_experts:
            raise ValueError(f"top_k={top_k} must be in [1, {num_logical_experts}]")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be > 0, got {hidden_size}")
        self.num_moe_layers = num_layers
        self.num_expert_groups = 1
        self.num_logical_experts = num_logical_experts
        self.num_routed_experts = num_logical_experts
        self.num_redundant_experts = num_redundant_experts
        self.num_physical_experts = num_physical
        self.num_local_physical_experts = num_physical // num_ranks
        self.num_shared_experts = 0
        self.num_ranks = num_ranks
        self.rank = rank
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = seed
        self.group = group

        first = rank * self.num_local_physical_experts
        local_experts = [
            p
            if p < num_logical_experts
            else (p - num_logical_experts) % num_logical_experts
            for p in range(first, first + self.num_local_physical_experts)
        ]
        self.moe_layers: list[ToyMoELayer] = []
        for layer in range(num_layers):
            stacked = [t.to(self.device) for t in self._stack(layer, local_experts)]
            self.moe_layers.append(ToyMoELayer(stacked))

    # -- MixtureOfExperts protocol ----------------------------------------
    def set_eplb_state(
        self,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        """vLLM's ``MixtureOfExperts.set_eplb_state``, step for step.

        ``expert_weights`` is created here, as in vLLM, and the layers keep
        views of EPLB's tensors, so commits in place are seen at once.
        """
        self.expert_weights = []
        for layer_idx, layer in enumerate(self.moe_layers):
            self.expert_weights.append(list(layer.get_expert_weights()))
            layer.set_eplb_state(
                moe_layer_idx=layer_idx,
                expert_load_view=expert_load_view,
                logical_to_physical_map=logical_to_physical_map,
                logical_replica_count=logical_replica_count,
            )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        raise NotImplementedError("ToyMoE does not support elastic EP")

    # -- weights -----------------------------------------------------------
    def expert_tensors(self, layer: int, expert: int) -> list[torch.Tensor]:
        """Weights of logical ``expert`` of ``layer``: a pure function of both."""
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + layer) * 100_003 + expert
        )
        size = self.hidden_size
        low, high = -_WEIGHT_RANGE, _WEIGHT_RANGE + 1
        # Drawn in their own dtypes: int64 drafts of big experts, freed
        # between smaller tensors, fragmented the heap (3x the weights' RSS).
        w = torch.randint(low, high, (size, size), generator=gen, dtype=self.dtype)
        bias = torch.randint(low, high, (size,), generator=gen, dtype=self.dtype)
        scale = torch.randint(1, 5, (size,), generator=gen, dtype=torch.uint8)
        return [w, bias, scale]

    def _stack(self, layer: int, experts: Sequence[int]) -> list[torch.Tensor]:
        """``expert_tensors`` of ``experts``, stacked ``[len(experts), ...]``
        on the host, filled in place: no second copy of the layer."""
        out: list[torch.Tensor] = []
        for i, expert in enumerate(experts):
            tensors = self.expert_tensors(layer, expert)
            if not out:
                out = [t.new_empty((len(experts), *t.shape)) for t in tensors]
            for dst, src in zip(out, tensors, strict=True):
                dst[i].copy_(src)
        return out

    def reference_weights(self, layer: int) -> list[torch.Tensor]:
        """Every logical expert of ``layer`` in its original form, ``[E, ...]``.

        Regenerated at each call and never kept: the unmoved model of every
        layer would outweigh the rank's own slots ``num_ranks`` times over.
        """
        return self._stack(layer, range(self.num_logical_experts))

    # -- inputs ------------------------------------------------------------
    def hidden_states(self, num_tokens: int) -> torch.Tensor:
        """Default input: integer-valued, deterministic, same on every rank."""
        t = torch.arange(num_tokens).unsqueeze(1)
        h = torch.arange(self.hidden_size).unsqueeze(0)
        values = (t * 7 + h * 3) % (2 * _WEIGHT_RANGE + 1) - _WEIGHT_RANGE
        return values.to(torch.float32)

    def default_gates(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Gates in multiples of 1/8 that depend on (token, k): exact to combine."""
        t = torch.arange(topk_ids.shape[-2]).unsqueeze(1)
        k = torch.arange(topk_ids.shape[-1]).unsqueeze(0)
        gates = ((t + 3 * k) % _GATE_DENOMINATOR + 1).to(torch.float32)
        return (gates / _GATE_DENOMINATOR).expand(topk_ids.shape)

    def _check_inputs(
        self,
        topk_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        gates: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if topk_ids.dim() != 3 or topk_ids.shape[0] != self.num_moe_layers:
            raise ValueError(
                f"topk_ids must have shape [{self.num_moe_layers}, T, K], "
                f"got {tuple(topk_ids.shape)}"
            )
        if topk_ids.numel() and (
            int(topk_ids.min()) < 0 or int(topk_ids.max()) >= self.num_logical_experts
        ):
            raise ValueError(
                f"topk_ids must be logical expert ids in "
                f"[0, {self.num_logical_experts}), got range "
                f"[{int(topk_ids.min())}, {int(topk_ids.max())}]"
            )
        num_tokens = topk_ids.shape[1]
        if hidden is None:
            hidden = self.hidden_states(num_tokens)
        if tuple(hidden.shape) != (num_tokens, self.hidden_size):
            raise ValueError(
                f"hidden must have shape ({num_tokens}, {self.hidden_size}), "
                f"got {tuple(hidden.shape)}"
            )
        if gates is None:
            gates = self.default_gates(topk_ids)
        if gates.shape != topk_ids.shape:
            raise ValueError(
                f"gates must have shape {tuple(topk_ids.shape)}, "
                f"got {tuple(gates.shape)}"
            )
        return hidden.to(torch.float32), gates.to(torch.float32)

    # -- forward -----------------------------------------------------------
    @staticmethod
    def _expert_output(
        x: torch.Tensor, tensors: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        w, bias, scale = tensors
        return (x @ w.float() + bias.float()) * scale.float()

    def _slot_outputs(
        self, layer: int, x: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        """``_expert_output`` of rows ``x [N, H]`` through local slots ``slot
        [N]`` (sorted): one matmul per used slot, bias and scale for all rows
        at once. A loop of a dozen small ops per slot made a DeepSeek-V3 step
        (58 layers x ~60 used slots a rank) take 1.5 s of CPU."""
        w, bias, scale = self.expert_weights[layer]
        y = torch.empty(x.shape[0], self.hidden_size)
        used, counts = torch.unique_consecutive(slot, return_counts=True)
        start = 0
        for s, count in zip(used.tolist(), counts.tolist(), strict=True):
            end = start + count
            torch.mm(x[start:end], w[s].to("cpu", torch.float32), out=y[start:end])
            start = end
        return (y + bias.to("cpu")[slot].float()) * scale.to("cpu")[slot].float()

    def forward(
        self,
        topk_ids: torch.Tensor,
        hidden: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
        record_load: bool = True,
    ) -> torch.Tensor:
        """One step: route through the maps, record load, compute, combine.

        ``topk_ids [L, T, K]`` logical ids (same on every rank); returns
        ``[L, T, H]`` fp32, identical on every rank after the all-reduce.
        """
        if not hasattr(self, "expert_weights"):
            raise RuntimeError("set_eplb_state() must be called before forward()")
        hidden, gates = self._check_inputs(topk_ids, hidden, gates)
        topk_ids = topk_ids.to(torch.int64)
        num_tokens = topk_ids.shape[1]
        slots = self.num_local_physical_experts
        out = torch.zeros(self.num_moe_layers, num_tokens, self.hidden_size)
        token_index = torch.arange(num_tokens).unsqueeze(1).expand(-1, self.top_k)
        mine = (token_index % self.num_ranks) == self.rank
        for layer in range(self.num_moe_layers):
            ids = topk_ids[layer]
            moe_layer = self.moe_layers[layer]
            log2phy = moe_layer.logical_to_physical_map.to("cpu")
            counts = moe_layer.logical_replica_count.to("cpu", torch.int64)
            replica = token_index % counts[ids].clamp_min(1)
            physical = log2phy[ids, replica]
            if record_load:
                recorded = physical[mine]
                view = moe_layer.expert_load_view
                view.index_add_(
                    0,
                    recorded.to(view.device),
                    torch.ones_like(recorded, dtype=view.dtype, device=view.device),
                )
            local = physical - self.rank * slots
            tok, k = ((local >= 0) & (local < slots)).nonzero(as_tuple=True)
            if not tok.numel():
                continue
            slot = local[tok, k]
            order = torch.argsort(slot, stable=True)
            tok, k, slot = tok[order], k[order], slot[order]
            y = self._slot_outputs(layer, hidden[tok], slot)
            out[layer].index_add_(0, tok, y * gates[layer, tok, k].unsqueeze(1))
        if self.num_ranks > 1:
            dist.all_reduce(out, group=self.group)
        return out

    def reference_forward(
        self,
        topk_ids: torch.Tensor,
        hidden: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same step with the original weights of every logical expert.

        Local and communication-free; equals ``forward`` bit for bit when the
        placement is consistent.
        """
        hidden, gates = self._check_inputs(topk_ids, hidden, gates)
        return torch.stack(
            [
                self.reference_layer_forward(
                    self.reference_weights(layer), topk_ids[layer], hidden, gates[layer]
                )
                for layer in range(self.num_moe_layers)
            ]
        )

    @classmethod
    def reference_layer_forward(
        cls,
        weights: Sequence[torch.Tensor],
        topk_ids: torch.Tensor,
        hidden: torch.Tensor,
        gates: torch.Tensor,
    ) -> torch.Tensor:
        """One layer of :meth:`reference_forward`: ``topk_ids [T, K]`` through
        ``weights`` (from :meth:`reference_weights`), ``[T, H]`` fp32.

        Lets a caller verify many steps of one layer on one generated layer.
        """
        topk_ids = topk_ids.to(torch.int64)
        out = torch.zeros(topk_ids.shape[0], hidden.shape[1])
        for expert in torch.unique(topk_ids).tolist():
            tok, k = (topk_ids == expert).nonzero(as_tuple=True)
            y = cls._expert_output(hidden[tok], [w[expert] for w in weights])
            out.index_add_(0, tok, y * gates[tok, k].unsqueeze(1))
        return out

    @classmethod
    def reference_expert_outputs(
        cls, weights: Sequence[torch.Tensor], hidden: torch.Tensor
    ) -> torch.Tensor:
        """Every logical expert of one layer on every token, ``[E, T, H]``
        fp32, from ``weights`` (from :meth:`reference_weights`).

        Verification computes these once per layer and combines them for
        every step (:meth:`combine_expert_outputs`): one matmul per expert
        instead of one per expert and step.
        """
        num_experts = weights[0].shape[0]
        out = torch.empty(num_experts, *hidden.shape)
        for expert in range(num_experts):
            out[expert] = cls._expert_output(hidden, [w[expert] for w in weights])
        return out

    @staticmethod
    def combine_expert_outputs(
        expert_outputs: torch.Tensor, topk_ids: torch.Tensor, gates: torch.Tensor
    ) -> torch.Tensor:
        """One step of one layer from :meth:`reference_expert_outputs`: the
        gated sum of each token's ``topk_ids [T, K]`` outputs, ``[T, H]``.

        Equal bit for bit to :meth:`reference_layer_forward` (exact arithmetic;
        adding ``0.0`` turns a ``-0.0`` sum into the ``+0.0`` of a sum that
        starts from zeros).
        """
        tokens = torch.arange(topk_ids.shape[0]).unsqueeze(1)
        picked = expert_outputs[topk_ids.to(torch.int64), tokens]  # [T, K, H]
        return (picked * gates.unsqueeze(-1)).sum(1) + 0.0

    def slot_experts(self, layer: int) -> list[int]:
        """Logical expert each local slot holds, read back from its weights.

        Lets tests check that the workspace matches the committed ``phy2log``.
        """
        reference = self.reference_weights(layer)
        found = []
        for slot in range(self.num_local_physical_experts):
            matches = [
                e
                for e in range(self.num_logical_experts)
                if all(
                    torch.equal(w[slot].to("cpu"), r[e])
                    for w, r in zip(self.expert_weights[layer], reference, strict=True)
                )
            ]
            found.append(matches[0] if matches else -1)
        return found
