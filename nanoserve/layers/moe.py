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

Low-bit experts (:meth:`FusedMoE.use_quantized`): the two parameters become stacked packed buffers, ``[E, bytes]``
uint8, row ``e`` expert ``e``'s gate_up ([2 I_r, H]) or down ([H, I_r]) in the layout of ``quantization/layout.py``.
Float checkpoints are quantized on load, each rank only its own slice, as it arrives through the same loader.
Pre-quantized checkpoints (compressed-tensors, GPTQ, AWQ) carry each expert's projections as that format's
tensors (``experts.{e}.gate_proj.weight_packed``, ``.weight_scale``, ...): each is an :class:`ExpertTensor`,
collected per :class:`ExpertPart` until the part is complete, then unpacked and sliced for this rank, as a dense
layer's parts are. Stacked pre-quantized tensors are not a hub layout and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.distributed.parallel_state import TPGroup, divide
from nanoserve.layers.linear import ReplicatedLinear, ShardRegion, check_shape

GATE, UP, DOWN = "gate", "up", "down"


@dataclass(frozen=True)
class ExpertPart:
    """One per-expert checkpoint tensor: ``proj`` (gate, up or down) of expert ``expert``. Also the key the
    loader counts it under, so a missing one is named by its expert."""

    expert: int
    proj: str

    def __str__(self) -> str:
        return f"expert {self.expert} {self.proj}_proj"


@dataclass(frozen=True)
class ExpertTensor:
    """One checkpoint tensor of an expert's part: ``suffix`` ``weight`` (float, or int-quantized's int8 codes) or
    a format's ``weight_packed`` / ``weight_scale`` / ``qweight`` / ... ``module``: the checkpoint's name of the
    part (``model.layers.0.mlp.experts.3.gate_proj``), which errors name. The loader counts it under ``part``."""

    part: ExpertPart
    suffix: str
    module: str

    def __str__(self) -> str:
        return f"{self.module}.{self.suffix}"


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
        # Low-bit experts: the packed shape of one expert's gate_up and down (None: float weights).
        self.gate_up_quant: Any = None
        self.down_quant: Any = None
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
        # A part of a pre-quantized expert counts as seen with its first tensor; one left without all of its
        # tensors is named by check_loaded (quantization/linear.py finish_loading).
        if isinstance(shard_id, ExpertTensor):
            return [shard_id.part]
        if isinstance(shard_id, ExpertPart):
            return [shard_id]
        projs = (GATE, UP) if shard_id == "gate_up" else (DOWN,)
        return [ExpertPart(e, p) for e in range(self.num_experts) for p in projs]

    def use_quantized(
        self, name: str, config: Any, kernels: Any, usable_tp_sizes: list[int] | None = None,
        gate_up: bool = True, down: bool = True,
    ) -> None:  # fmt: skip
        """Hold the experts' ``gate_up`` and / or ``down`` weights as low-bit codes (``config``: a
        ``QuantizationConfig``), before anything is loaded: each float parameter is replaced by an ``[E, bytes]``
        packed buffer that keeps its loader. Quantize on load: both float layouts arrive as before and are
        quantized one expert at a time. A pre-quantized checkpoint (``config.tensor_format``): each expert's
        tensors are unpacked into its row once all of them have arrived. Under TP the group size must divide
        this rank's slice of the intermediate (down's input), or this raises naming the TP sizes that work."""
        from nanoserve.quantization.linear import QuantizedWeight

        E, H, i_r, tp = self.num_experts, self.hidden_size, self.intermediate_per_rank, self.tp.size
        source = config.tensor_format
        if gate_up:
            self.gate_up_quant = QuantizedWeight(f"{name}.gate_up_proj", source, config.scheme, 2 * i_r, H, config, kernels)
        if down:
            self.down_quant = QuantizedWeight(
                f"{name}.down_proj", source, config.scheme, H, i_r, config, kernels, tp, 1, usable_tp_sizes
            )
        for attr, quant in (("gate_up_proj", self.gate_up_quant), ("down_proj", self.down_quant)):
            if quant is None:
                continue
            old = getattr(self, attr)
            buf = quant.allocate()
            packed = nn.Parameter(buf.new_zeros(E, buf.numel()), requires_grad=False)
            packed.weight_loader = old.weight_loader
            packed.checkpoint_parts = old.checkpoint_parts
            packed.parts_filled = old.parts_filled
            setattr(self, attr, packed)

    # ---- loading -------------------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of ``loaded`` into ``param``. ``shard_id``: an :class:`ExpertTensor` (or an
        :class:`ExpertPart`, its float ``weight``) for a per-expert tensor ([I, H] gate or up, [H, I] down, or a
        format's tensors of those), or ``"gate_up"`` / ``"down"`` for a stacked one ([E, 2 I, H] / [E, H, I])."""
        E, H, inter, i_r = self.num_experts, self.hidden_size, self.intermediate_size, self.intermediate_per_rank
        lo, hi = self.tp.rank * i_r, (self.tp.rank + 1) * i_r
        if (self.down_quant if param is self.down_proj else self.gate_up_quant) is not None:
            self._quantize_part(param, loaded, shard_id)
            return
        if isinstance(shard_id, ExpertTensor):
            if shard_id.suffix != "weight":
                raise ValueError(
                    f"{shard_id}: a low-bit tensor, but this model's experts hold float weights (the checkpoint's "
                    "quantization_config does not cover them, or it has none)"
                )
            shard_id = shard_id.part
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

    def _quantize_part(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
        """The low-bit loader: this rank's rows (gate, up) or columns (down) of each expert, quantized (a float
        checkpoint) or unpacked (a format's tensors, once all of a part's have arrived) into its row of the
        packed ``param``. A stacked float tensor is read one expert at a time."""
        E, H, inter, i_r = self.num_experts, self.hidden_size, self.intermediate_size, self.intermediate_per_rank
        lo = self.tp.rank * i_r
        gate_up, down = self.gate_up_quant, self.down_quant
        # Regions in the dense layers' terms: gate and up split their rows (dst 0 and I_r), down its columns.
        rows = {GATE: ShardRegion(0, lo, i_r, 0, (inter, H)), UP: ShardRegion(0, lo, i_r, i_r, (inter, H))}
        cols = ShardRegion(1, lo, i_r, 0, (H, inter))
        if isinstance(shard_id, (ExpertPart, ExpertTensor)):
            if isinstance(shard_id, ExpertPart):
                part, suffix, module = shard_id, "weight", None
            else:
                part, suffix, module = shard_id.part, shard_id.suffix, shard_id.module
            e = part.expert
            if not 0 <= e < E:
                raise ValueError(f"expert {e} does not exist: the config has {E} experts")
            quant, region = (down, cols) if part.proj == DOWN else (gate_up, rows[part.proj])
            if quant.source == "float" and suffix != "weight":
                raise ValueError(
                    f"{shard_id}: a low-bit tensor, but the checkpoint has no quantization_config for it (quantize "
                    "on load reads float weights)"
                )
            # Pending tensors are keyed by the expert's part: all experts of the layer share one QuantizedWeight.
            quant.load(param.data[e], suffix, loaded, region, part, module)
            return
        quant = gate_up if shard_id == "gate_up" else down
        if shard_id in ("gate_up", "down") and quant.source != "float":
            raise ValueError(
                f"stacked expert tensor (experts.{shard_id}_proj) in a {quant.source} checkpoint: pre-quantized "
                "experts are read one expert and projection at a time, as the hub stores them "
                "(experts.{e}.gate_proj.weight_packed, ...); a stacked layout of them is not a hub format"
            )
        if shard_id == "gate_up":
            check_shape(loaded, (E, 2 * inter, H))
            for e in range(E):
                full = loaded[e : e + 1][0]  # [2 I, H]: one expert read at a time
                gate_up.load(param.data[e], "weight", full[:inter], rows[GATE], shard_id)
                gate_up.load(param.data[e], "weight", full[inter:], rows[UP], shard_id)
        elif shard_id == "down":
            check_shape(loaded, (E, H, inter))
            for e in range(E):
                down.load(param.data[e], "weight", loaded[e : e + 1][0], cols, shard_id)
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 weights this rank computes with: (gate_up [E, 2 I_r, H], down [E, H, I_r])."""
        def widen(param: nn.Parameter, quant: Any) -> torch.Tensor:
            return param.data.float() if quant is None else torch.stack([quant.dequantized(b) for b in param.data])

        return widen(self.gate_up_proj, self.gate_up_quant), widen(self.down_proj, self.down_quant)

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
            gate_up = self._linear(x.index_select(0, rows), self.gate_up_proj[e], self.gate_up_quant)  # [n, 2 I_r]
            h = F.silu(gate_up[:, :i_r]) * gate_up[:, i_r:]
            y = self._linear(h, self.down_proj[e], self.down_quant)  # [n, H]
            out.index_add_(0, rows, (y * slot_weights[start : start + n, None]).to(out.dtype))
            start += n
        return out

    @staticmethod
    def _linear(x: torch.Tensor, weight: torch.Tensor, quant: Any) -> torch.Tensor:
        # weight: one expert's float [N, K], or its packed row (the dense layers' low-bit kernels multiply it)
        return F.linear(x, weight) if quant is None else quant.matmul(x, weight, None)

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
        # The router stays float32 under quantization (as vLLM keeps it): it is tiny, and low-bit router logits
        # would change which experts a token picks, not just how precisely they compute.
        self.gate.keep_float = True
        # The C decode loop (models/native_decode.py) has no experts kernel: a layer without kernels makes it
        # decline the whole model, which then runs the per-layer path.
        self.kernels = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
