"""Mixture-of-experts: a replicated router picks ``top_k`` of ``num_experts`` SwiGLU MLPs per token, and only
the experts some token of the step chose run, each on the tokens routed to it.

Weights are stacked, expert-major, in the layout transformers 5 keeps in memory::

    gate_up_proj  [E, 2 * I_r, H]   rows [0, I_r) gate, [I_r, 2 I_r) up   (I_r = moe_intermediate / tp)
    down_proj     [E, H, I_r]

Under tensor parallelism each expert's intermediate dimension is split as a dense MLP's is (vLLM's choice):
rank r holds rows ``[r I_r, (r + 1) I_r)`` of every expert's gate and up, the same columns of its down, and
the partial sums are all-reduced once after the experts. The router is replicated, so every rank picks the
same experts for a token without talking to the others.

Checkpoints come in two layouts, both loaded by :meth:`FusedMoE.weight_loader`: one tensor per expert and
projection (the hub's, and what ``save_pretrained`` writes by default: ``experts.{e}.gate_proj.weight``, or
Mixtral's ``w1`` / ``w3`` / ``w2``), or the stacked tensors above (``save_original_format=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.distributed.parallel_state import TPGroup, divide
from nanoserve.layers.linear import ReplicatedLinear, check_shape

GATE, UP, DOWN = "gate", "up", "down"


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert checkpoint tensor: ``proj`` (gate, up or down) of expert ``expert``. Also the key the
    loader counts it under, so a missing one is named by its expert."""

    expert: int
    proj: str

    def __str__(self) -> str:
        return f"expert {self.expert} {self.proj}_proj"


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): softmax over all experts in float32, the top k, divided by
    their sum when ``renormalize`` (Mixtral always; Qwen3-MoE when ``norm_topk_prob``), as transformers does."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The experts of one sparse layer. ``forward(x, router_logits)`` returns the weighted sum of each token's
    chosen experts, all-reduced over the tensor-parallel group."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
        dtype: torch.dtype, tp: TPGroup, float32_weights: bool = False,
    ) -> None:  # fmt: skip
        """``float32_weights``: scale each expert's output by its float32 routing weight and round the product
        (Mixtral), rather than round the weights to the activations' dtype first (Qwen3-MoE); the two differ in
        bfloat16 only."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.renormalize = renormalize
        self.float32_weights = float32_weights
        self.tp = tp
        self.intermediate_size = intermediate_size  # per expert, whole (all ranks)
        self.intermediate_per_rank = divide(intermediate_size, tp.size, "moe_intermediate_size")
        i_r = self.intermediate_per_rank
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * i_r, hidden_size, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, i_r, dtype=dtype), requires_grad=False)
        for param, projs in ((self.gate_up_proj, (GATE, UP)), (self.down_proj, (DOWN,))):
            param.weight_loader = self.weight_loader
            # What the loader must have seen for this parameter: every expert's part, whichever layout
            # delivered it (a stacked tensor fills all of them at once, see ``parts_filled``).
            param.checkpoint_parts = [ExpertPart(e, p) for e in range(num_experts) for p in projs]
            param.parts_filled = self._parts_filled

    def _parts_filled(self, shard_id: Any) -> list[ExpertPart]:
        if isinstance(shard_id, ExpertPart):
            return [shard_id]
        projs = (GATE, UP) if shard_id == "gate_up" else (DOWN,)
        return [ExpertPart(e, p) for e in range(self.num_experts) for p in projs]

    # ---- loading -------------------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of ``loaded`` into ``param``. ``shard_id``: an :class:`ExpertPart` for a
        per-expert tensor ([I, H] gate or up, [H, I] down), or ``"gate_up"`` / ``"down"`` for a stacked one
        ([E, 2 I, H] / [E, H, I])."""
        E, H, inter, i_r = self.num_experts, self.hidden_size, self.intermediate_size, self.intermediate_per_rank
        lo, hi = self.tp.rank * i_r, (self.tp.rank + 1) * i_r
        if isinstance(shard_id, ExpertPart):
            e = shard_id.expert
            if not 0 <= e < E:
                raise ValueError(f"expert {e} does not exist: the config has {E} experts")
            if shard_id.proj == DOWN:
                check_shape(loaded, (H, inter))
                param.data[e].copy_(loaded[:, lo:hi])
            else:
                check_shape(loaded, (inter, H))
                row = 0 if shard_id.proj == GATE else i_r
                param.data[e, row : row + i_r].copy_(loaded[lo:hi])
        elif shard_id == "gate_up":
            check_shape(loaded, (E, 2 * inter, H))
            param.data[:, :i_r].copy_(loaded[:, lo:hi])
            param.data[:, i_r:].copy_(loaded[:, inter + lo : inter + hi])
        elif shard_id == "down":
            check_shape(loaded, (E, H, inter))
            param.data.copy_(loaded[:, :, lo:hi])
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; router_logits: [T, E]
        weights, ids = route(router_logits, self.top_k, self.renormalize)
        out = self.experts(x, weights if self.float32_weights else weights.to(x.dtype), ids)
        self.tp.all_reduce(out)
        return out

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum over each token's chosen experts (no all-reduce). ``weights``, ``ids``: [T, k].

        The step's (token, slot) assignments are sorted by expert, so each active expert gathers its tokens,
        runs once on all of them (its weights read once per step) and adds its weighted rows back; experts no
        token chose are never touched. Experts are visited in increasing order, as transformers does, so each
        token's sum is taken in the same order."""
        flat = ids.flatten()  # [T * k]: slot j of token t at t * k + j
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync of the layer
        tokens = order // self.top_k
        slot_weights = weights.flatten()[order]
        out = torch.zeros_like(x)
        i_r = self.intermediate_per_rank
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start : start + n]
            gate_up = F.linear(x.index_select(0, rows), self.gate_up_proj[e])  # [n, 2 I_r]
            h = F.silu(gate_up[:, :i_r]) * gate_up[:, i_r:]
            y = F.linear(h, self.down_proj[e])  # [n, H]
            out.index_add_(0, rows, (y * slot_weights[start : start + n, None]).to(out.dtype))
            start += n
        return out

    def active_parameter_bytes(self) -> int:
        """Bytes of this rank's expert weights one token reads: ``top_k`` of the ``num_experts`` experts."""
        total = sum(p.numel() * p.element_size() for p in (self.gate_up_proj, self.down_proj))
        return total * self.top_k // self.num_experts


class SparseMoeBlock(nn.Module):
    """The MLP of a sparse decoder layer: router ``gate`` (a replicated linear, no bias) and the experts."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
        dtype: torch.dtype, tp: TPGroup, hidden_act: str = "silu", float32_weights: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported for experts (only 'silu')")
        self.experts = FusedMoE(
            num_experts, top_k, hidden_size, intermediate_size, renormalize, dtype, tp, float32_weights
        )
        self.gate = ReplicatedLinear(hidden_size, num_experts, False, dtype)
        # The C decode loop (models/native_decode.py) has no experts kernel: a layer without kernels makes it
        # decline the whole model, which then runs the per-layer path.
        self.kernels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
