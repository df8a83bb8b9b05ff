"""Low-bit weights inside the model's linear layers: which layers, how each loads, how each multiplies.

:func:`quantize_model` runs right after a model is built (before any weight is read, and for ``nanoserve plan``
on the meta device): each chosen layer drops its float weight and gets a :class:`QuantizedWeight`, which owns
the packed buffer's shape, receives the layer's checkpoint tensors (a float ``weight`` to quantize, or a
format's packed tensors) one part at a time, and runs the kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.layers import native
from nanoserve.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanoserve.layers.linear import LinearBase, ShardRegion, check_shape
from nanoserve.layers.moe import FusedMoE
from nanoserve.quantization import formats, layout
from nanoserve.quantization.config import QuantizationConfig, WeightScheme, module_skipped
from nanoserve.quantization.quantize import ROWS_PER_PIECE, quantize

logger = logging.getLogger(__name__)

# Above this many rows of x, float32 activations run as "widen a slab of rows to float32, then a float GEMM":
# re-widening the codes for every row of x costs more than the GEMM's reads of the widened slab.
DEQUANT_GEMM_MIN_ROWS = 16
DEQUANT_SLAB_ROWS = 256  # rows widened at a time (a multiple of the layout's 8-row tile)


class QuantizedWeight:
    """The low-bit weight of one linear layer (this rank's shard): shape, source format, kernels."""

    def __init__(
        self, name: str, source: str, scheme: WeightScheme, out_features: int, in_features: int,
        config: QuantizationConfig, kernels: Any, tp_size: int = 1, split_dim: int = 0,
        usable_tp_sizes: list[int] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.source = source  # QuantizationConfig.tensor_format: "float" (quantize on load) or a checkpoint format
        self.scheme = scheme
        self.config = config
        self.kernels = kernels
        self.int8_activations = config.activations == "int8"
        try:
            self.shape = layout.PackedShape.create(out_features, in_features, scheme.bits, scheme.group_size, scheme.asymmetric)
        except ValueError as exc:
            hint = _tp_hint(in_features, tp_size, scheme.group_size, split_dim, usable_tp_sizes)
            raise ValueError(f"{name}: {exc}{hint}") from exc
        self.perm: torch.Tensor | None = None  # GPTQ act-order: the input columns in group order
        self._pending: dict[Any, dict[str, torch.Tensor]] = {}
        self._names: dict[Any, str] = {}  # checkpoint module name of each pending part

    @property
    def suffixes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) checkpoint tensor suffixes of each part of this layer."""
        if self.source == "float":
            return ("weight",), ()
        required, optional = formats.SUFFIXES[self.source]
        if self.source == "gptq" and self.config.desc_act:
            required = required + ("g_idx",)
        if self.source == "compressed-tensors" and self.scheme.asymmetric:
            required = required + ("weight_zero_point",)
        return required, optional

    def allocate(self) -> torch.Tensor:
        return layout.allocate(self.shape)

    # ---- loading -------------------------------------------------------------------------------------
    def load(
        self, buf: torch.Tensor, suffix: str, loaded: Any, region: ShardRegion, shard_id: Any,
        checkpoint_name: str | None = None,
    ) -> None:  # fmt: skip
        """Take one checkpoint tensor of part ``shard_id`` (``checkpoint_name``: that part's module name in the
        checkpoint, e.g. ``...q_proj``, which errors name; default: this layer's name)."""
        checkpoint_name = checkpoint_name or self.name
        if self.source == "int-quantized" and suffix == "weight_zero_point":
            # Symmetric: all zeros, checked and dropped. It may sort (or sit in a shard file) after its part's
            # weight and scale, which complete the part, so it is not held as pending.
            full_n, full_k = region.full_shape
            formats.check_zero_points(f"{checkpoint_name}.{suffix}", loaded[:], full_n, full_k, self.scheme.group_size)
            return
        if self.source == "float":
            try:
                self._quantize_float(buf, loaded, region)
            except ValueError as exc:
                raise ValueError(f"{checkpoint_name}.{suffix}: {exc}") from exc
            return
        required, optional = self.suffixes
        if suffix not in required + optional:
            raise ValueError(f"{checkpoint_name}.{suffix}: unexpected tensor for a layer in {self.source} format")
        # Packed tensors are small; read now (the file may close before the part's last tensor arrives).
        part = self._pending.setdefault(shard_id, {})
        part[suffix] = loaded[:]
        self._names[shard_id] = checkpoint_name
        if all(s in part for s in required):
            del self._pending[shard_id]
            self._store_checkpoint_part(buf, part, region, self._names.pop(shard_id))

    def _quantize_float(self, buf: torch.Tensor, loaded: Any, region: ShardRegion) -> None:
        check_shape(loaded, region.full_shape)
        rows = region.full_shape[0] if region.split_dim == 1 else region.size
        for i in range(0, rows, ROWS_PER_PIECE):
            n = min(ROWS_PER_PIECE, rows - i)
            if region.split_dim == 0:
                piece = loaded[region.start + i : region.start + i + n]
            else:
                piece = loaded[i : i + n, region.start : region.start + region.size]
            codes, scales, zeros = quantize(piece, self.scheme)
            layout.write_rows(buf, self.shape, region.dst_row + i, codes, scales, zeros)

    def _store_checkpoint_part(
        self, buf: torch.Tensor, tensors: dict[str, torch.Tensor], region: ShardRegion, checkpoint_name: str
    ) -> None:
        full_n, full_k = region.full_shape
        s = self.scheme
        u = formats.unpack(
            self.source, tensors, checkpoint_name, full_n, full_k, s.bits, s.group_size, not s.asymmetric,
            self.config.gptq_zero_offset,
        )  # fmt: skip
        codes, scales, zeros = u.codes, u.scales, u.zeros
        if u.g_idx is not None:
            codes = self._act_order(codes, u.g_idx, region, checkpoint_name)
        if region.split_dim == 0:
            sl = slice(region.start, region.start + region.size)
            codes, scales = codes[sl], scales[sl]
            zeros = zeros[sl] if zeros is not None else None
        elif u.g_idx is None:
            codes = codes[:, region.start : region.start + region.size]
            if s.group_size != -1:
                if region.start % s.group_size or region.size % s.group_size:
                    raise ValueError(
                        f"{checkpoint_name}: this rank's input columns [{region.start}, {region.start + region.size}) split "
                        f"a group of {s.group_size}{_tp_hint(region.size, full_k // region.size, s.group_size, 1)}"
                    )
                gs = slice(region.start // s.group_size, (region.start + region.size) // s.group_size)
                scales = scales[:, gs]
                zeros = zeros[:, gs] if zeros is not None else None
        layout.write_rows(buf, self.shape, region.dst_row, codes, scales.contiguous(), None if zeros is None else zeros.contiguous())

    def _act_order(self, codes: torch.Tensor, g_idx: torch.Tensor, region: ShardRegion, checkpoint_name: str) -> torch.Tensor:
        """GPTQ act-order: sort the input columns by group so each group is contiguous again; the layer then
        permutes its input the same way. Parts of a fused layer share the input, so they must share the order."""
        if region.split_dim == 1 and region.size != region.full_shape[1]:
            raise ValueError(
                f"{checkpoint_name}: act-order (desc_act) GPTQ weights assign this layer's input columns to groups "
                "across the whole input, so splitting it over ranks cuts groups; run it with tensor_parallel_size 1"
            )
        perm = torch.argsort(g_idx, stable=True)
        counts = torch.bincount(g_idx, minlength=self.shape.num_groups)
        if self.scheme.group_size != -1 and not torch.all(counts == self.scheme.group_size):
            raise ValueError(f"{checkpoint_name}.g_idx: groups of unequal size {sorted(set(counts.tolist()))}")
        if self.perm is not None and not torch.equal(self.perm, perm):
            raise ValueError(
                f"{checkpoint_name}.g_idx: its act-order column order differs from the other parts of the fused "
                f"layer {self.name} (they read the same input, so GPTQ gives them one order)"
            )
        self.perm = perm
        return codes[:, perm]

    def check_loaded(self) -> None:
        """Raise naming every part some of whose tensors arrived but not all (by its checkpoint name)."""
        if self._pending:
            parts = ", ".join(
                f"{self._names.get(k, self.name)} (part {k}): has {', '.join(sorted(v))}" for k, v in self._pending.items()
            )  # fmt: skip
            raise ValueError(f"incomplete quantized tensors ({parts}); need {', '.join(self.suffixes[0])}")

    # ---- compute -------------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, buf: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        if self.kernels is None:  # no compiler: the reference arithmetic (slow, exact), int8 activations included
            if self.int8_activations:
                return layout.reference_linear(x, buf, self.shape, bias, int8_activations=True)
            return F.linear(x, layout.dequantize(buf, self.shape), bias)
        if not self.int8_activations and x.shape[0] >= DEQUANT_GEMM_MIN_ROWS:
            return self._slab_gemm(x, buf, bias)
        return native.q_linear(self.kernels, x, buf, self.shape, bias, self.int8_activations)

    def _slab_gemm(self, x: torch.Tensor, buf: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, k = self.shape.out_features, self.shape.in_features
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        for r0 in range(0, n, DEQUANT_SLAB_ROWS):
            rows = min(DEQUANT_SLAB_ROWS, n - r0)
            w = native.q_dequantize_rows(self.kernels, buf, self.shape, r0, rows)[:, :k]
            out[:, r0 : r0 + rows] = F.linear(x, w, None if bias is None else bias[r0 : r0 + rows])
        return out

    def dequantized(self, buf: torch.Tensor) -> torch.Tensor:
        """The float32 weight [N, K] this layer computes with (columns in the checkpoint's order)."""
        w = layout.dequantize(buf, self.shape)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w


def _tp_hint(in_features: int, tp_size: int, group_size: int, split_dim: int, usable: list[int] | None = None) -> str:
    """For a row-parallel layer whose groups do not fit this rank's share of the input: the sizes that do
    (among ``usable``, the sizes the model's heads allow, when known)."""
    if split_dim != 1 or tp_size == 1 or group_size in (-1, 0):
        return ""
    full = in_features * tp_size
    ok = [t for t in (usable or range(1, 17)) if full % t == 0 and (full // t) % group_size == 0]
    return (
        f" (input size {full} over tensor_parallel_size {tp_size} gives {in_features} per rank; with group size "
        f"{group_size} the sizes that work are {', '.join(map(str, ok))})"
    )


def _module_names(name: str, packed: dict[str, tuple[str, Any]]) -> list[str]:
    """Our module name and the checkpoint's names of its parts (``qkv_proj`` -> ``q_proj``, ``k_proj``, ...)."""
    leaf = name.rsplit(".", 1)[-1]
    parts = [name[: -len(leaf)] + ckpt for ckpt, (ours, _) in packed.items() if ours == leaf]
    return [name, *parts]


def quantize_model(model: nn.Module, config: QuantizationConfig, kernels: Any, hf_config: Any = None) -> int:
    """Switch the chosen layers of a freshly built ``model`` to low-bit weights; returns how many."""
    from nanoserve.config import usable_tensor_parallel_sizes

    packed = getattr(model, "packed_modules_mapping", {})
    usable = usable_tensor_parallel_sizes(hf_config) if hf_config is not None else None
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            count += _quantize_experts(model, name, module, config, kernels, usable)
        elif isinstance(module, LinearBase) and not getattr(module, "keep_float", False):  # routers stay float
            names = _module_names(name, packed)
            user_skip = config.on_load and _all_or_none(config.skip, names, name, "quantization_skip")
            ckpt_skip = not config.on_load and _all_or_none(config.checkpoint_ignore, names, name, "the checkpoint's ignore list")
            if user_skip or ckpt_skip:
                continue
            source = config.tensor_format
            tp = getattr(module, "tp", None)
            split_dim = module.shard_region(None).split_dim
            module.use_quantized(QuantizedWeight(
                name, source, config.scheme, module.out_features, module.in_features, config, kernels,
                tp.size if tp is not None else 1, split_dim, usable,
            ))  # fmt: skip
            count += 1
        elif isinstance(module, ParallelLMHead) and config.on_load and config.lm_head is not None:
            module.use_quantized(QuantizedWeight(
                name, "float", config.lm_head, module.shard_size, module.weight.shape[1], config, kernels,
            ))  # fmt: skip
            count += 1
    _embedding_at_stored_size(model, config, hf_config)
    logger.info("quantized %d layers (%s)", count, config.describe())
    return count


def _quantize_experts(
    model: nn.Module, name: str, module: FusedMoE, config: QuantizationConfig, kernels: Any, usable: list[int] | None
) -> int:
    """Switch the experts' gate_up and down to low-bit unless ``quantization_skip`` names them: the layer
    (``mlp.experts``, ``mlp``), or a projection by our name or the checkpoint's (``down_proj``; Mixtral's ``w2``).
    gate and up share one buffer, so they are skipped together or not at all. Returns how many it switched.
    A pre-quantized checkpoint's experts are low-bit unless its ignore list names them (see
    :func:`_experts_ignored`)."""
    if not config.on_load:
        gate_up, down = _experts_ignored(model, name, module, config.checkpoint_ignore)
        if not (gate_up and down):
            module.use_quantized(name, config, kernels, usable, gate_up=not gate_up, down=not down)
        return int(not gate_up) + int(not down)
    gate, up, down = getattr(model, "expert_projection_names", ("gate_proj", "up_proj", "down_proj"))
    if module_skipped(config.skip, [name]):
        return 0
    gate_up = not _all_or_none(config.skip, [f"{name}.gate_up_proj", f"{name}.{gate}", f"{name}.{up}"], name, "quantization_skip")
    down = not module_skipped(config.skip, [f"{name}.down_proj", f"{name}.{down}"])
    if gate_up or down:
        module.use_quantized(name, config, kernels, usable, gate_up=gate_up, down=down)
    return int(gate_up) + int(down)


def _experts_ignored(model: nn.Module, name: str, module: FusedMoE, ignore: tuple[str, ...]) -> tuple[bool, bool]:
    """(gate_up, down) of experts layer ``name`` kept in float by a checkpoint's ignore list, which names modules
    as the checkpoint does: one per expert and projection (``model.layers.0.mlp.experts.3.gate_proj``; Mixtral's
    ``block_sparse_moe.experts.3.w1``), or the whole layer. The experts of a layer share one stacked buffer, so
    the list must name all of a layer's gate and up (or down) projections or none of them."""
    if not ignore:
        return False, False
    gate, up, down = getattr(model, "expert_projection_names", ("gate_proj", "up_proj", "down_proj"))
    layer = name.rsplit(".mlp.experts", 1)[0] + f".{getattr(model, 'expert_block_name', 'mlp')}.experts"
    if module_skipped(ignore, [name, layer]):
        return True, True
    experts = range(module.num_experts)
    result = []
    for projs in ((gate, up), (down,)):
        names = [f"{layer}.{e}.{p}" for e in experts for p in projs]
        hits = [module_skipped(ignore, [n]) for n in names]
        if any(hits) and not all(hits):
            named = [n for n, hit in zip(names, hits) if hit]
            raise ValueError(
                f"the checkpoint's ignore list keeps only some of the expert projections of {layer} in float "
                f"({', '.join(named[:4])}{', ...' if len(named) > 4 else ''}); nanoserve holds a layer's "
                f"{'/'.join(projs)} of all experts in one stacked buffer: all of them low-bit or none"
            )
        result.append(all(hits))
    return result[0], result[1]


def _embedding_at_stored_size(model: nn.Module, config: QuantizationConfig, hf_config: Any) -> None:
    """A bf16/fp16 checkpoint's embedding stays in that type (half the bytes of float32, values unchanged),
    unless a float LM head shares it (tied and not quantized: the logits GEMM would read it in float)."""
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(stored).removeprefix("torch."))
    head = getattr(model, "lm_head", None)
    embed = next((m for m in model.modules() if type(m) is VocabParallelEmbedding), None)
    if stored is None or embed is None or (getattr(head, "tied", False) and head.quant is None):
        return
    embed.store_as(stored)


def _all_or_none(patterns: tuple[str, ...], names: list[str], name: str, what: str) -> bool:
    """Whether ``patterns`` skip this layer; a fused layer is skipped whole or not at all."""
    if not patterns:
        return False
    hits = [module_skipped(patterns, [n]) for n in names]
    if hits[0] or (len(hits) > 1 and all(hits[1:])):
        return True
    if any(hits[1:]):
        raise ValueError(
            f"{what} names only some parts of the fused layer {name} ({', '.join(n for n, h in zip(names[1:], hits[1:]) if h)}); "
            "its parts share one weight: name all of them or none"
        )
    return False


def finish_loading(model: nn.Module) -> None:
    """After the loader: quantize what could only be quantized once loaded (a tied LM head, from the
    embedding), and check that no layer is left with part of its tensors."""
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if isinstance(quant, QuantizedWeight):
            quant.check_loaded()
            if isinstance(module, ParallelLMHead):
                module.finish_loading()
        elif isinstance(module, FusedMoE):  # pre-quantized experts: a part left without one of its tensors
            for quant in (module.gate_up_quant, module.down_quant):
                if quant is not None:
                    quant.check_loaded()


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Float32 weights of every quantized layer, by module name, as this rank computes with them."""
    return {
        name: module.quant.dequantized(module.packed.data)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "quant", None), QuantizedWeight)
    }
