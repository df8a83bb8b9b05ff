"""An independent packer for the hub's low-bit weight formats, so unpackers can be tested against it.

Written from the formats' own sources (AutoGPTQ ``QuantLinear.pack`` and ``GPTQ.fasterquant``, GPTQModel's
v1/v2 zero conversion, AutoAWQ ``WQLinear_GEMM.from_linear``, compressed-tensors ``pack_to_int32``,
``PackedQuantizationCompressor`` and ``IntQuantizationCompressor``, transformers' ``GPTQConfig`` /
``AwqConfig``), never from nanoserve's
unpacker: a shared misreading of a layout would otherwise pass both.

Every format here stores the same quantity. For a linear weight ``w: [N, K]`` (out, in) with ``G``
input columns per group (``G = K`` when ``group_size == -1``), ``codes`` are unsigned ``0 .. 2^b - 1`` and

    w[n, k] = scales[n, g] * (codes[n, k] - zeros[n, g]),   g = k // G   (or g = g_idx[k], GPTQ desc_act)

The formats differ in how they lay that out:

    format               tensor              dtype    shape                    content
    GPTQ v1 ("gptq")     qweight             int32    [K*b/32, N]              codes, packed along K
                         qzeros              int32    [K/G, N*b/32]            zeros - 1, packed along N
                         scales              float16  [K/G, N]
                         g_idx               int32    [K]                      group of each input column
    AWQ GEMM             qweight             int32    [K, N/8]                 codes, packed along N, interleaved
                         qzeros              int32    [K/G, N/8]               zeros, packed along N, interleaved
                         scales              float16  [K/G, N]
    compressed-tensors   weight_packed       int32    [N, ceil(K*b/32)]        codes, packed along K
    pack-quantized       weight_scale        float*   [N, K/G]                 ([N, 1] for strategy "channel")
                         weight_zero_point   int32    [ceil(N*b/32), K/G]      zeros, packed along N (asym only)
                         weight_shape        int64    [2]                      [N, K]
    compressed-tensors   weight              int8     [N, K]                   codes - 128 (signed, unpacked)
    int-quantized        weight_scale        float*   [N, K/G]                 ([N, 1] for strategy "channel")
    (W8A8, symmetric)    no weight_zero_point: compressed-tensors >= 0.12 drops a symmetric scheme's zeros

All packing is LSB first: value ``i`` of a run sits at bits ``i*b .. i*b+b-1`` of the run's bit stream,
which fills int32 words from bit 0 (so for b in 2/4/8 word ``j`` holds values ``j*32/b ..``; for b = 3 a
value can straddle two words, exactly as AutoGPTQ's 3-bit pack and compressed-tensors' dense pack do).
AWQ alone reorders: nibble ``i`` of a word holds column ``AWQ_PACK_ORDER[i]`` of its block of 8.

``write_quantized_checkpoint`` turns a ``build_checkpoint`` model into a checkpoint of one format plus a
``dequantized/`` twin holding exactly the weights the quantized one encodes: the oracle an engine's
quantized path must match.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ GEMM: nibble ``i`` (bits ``4i .. 4i+3``) of a packed word holds output column ``8*j + AWQ_PACK_ORDER[i]``."""
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""The inverse: output column ``8*j + c`` lives in nibble ``AWQ_REVERSE_ORDER[c]``."""

GPTQ_BITS = (2, 3, 4, 8)
QUANTIZED_MODULE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj"
    r"|mlp\.experts\.\d+\.(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])$"
)
"""The Linear modules ``write_quantized_checkpoint`` quantizes (minus any matching ``skip``): the dense layers',
and each expert's of a mixture-of-experts layer (Qwen3-MoE's ``mlp.experts.{e}.gate_proj``, Mixtral's
``block_sparse_moe.experts.{e}.w1``), one expert at a time as llmcompressor / GPTQ / AWQ write them. Routers
(``mlp.gate``, ``block_sparse_moe.gate``) stay float, as llmcompressor's MoE recipes ignore them."""
ROUTER = re.compile(r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.gate\.weight$")
FORMATS = ("gptq", "awq", "compressed-tensors", "int-quantized")
"""``int-quantized`` is compressed-tensors' W8A8 format (its ``quant_method`` is "compressed-tensors" too)."""
COMPRESSED_TENSORS_VERSION = "0.20.1"
"""What ``version`` the compressed-tensors config claims: the library this module was checked against."""


# --------------------------------------------------------------------------------------------------
# Codes, scales, zeros
# --------------------------------------------------------------------------------------------------


def resolve_group_size(k: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or ``k`` for ``-1`` (one group per row); must divide ``k``."""
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g:
        raise ValueError(f"group_size={group_size} must be -1 or a positive divisor of in_features={k}")
    return g


def random_codes(
    n: int, k: int, bits: int, group_size: int, symmetric: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(codes, scales, zeros)`` for an ``[n, k]`` weight; deterministic in ``seed``.

    ``codes``: int64 ``[n, k]`` uniform in ``0 .. 2^bits - 1``. ``scales``: float32 ``[n, k // G]`` in
    about ``[1e-3, 1e-1]``, each exactly representable in bfloat16 and float16, so every format stores
    them without rounding. ``zeros``: int64 ``[n, k // G]``, ``2^(bits-1)`` everywhere when ``symmetric``,
    else uniform in ``1 .. 2^bits - 1`` (never 0, which GPTQ v1 cannot store; see ``pack_gptq``).
    Dequantized: ``w[n, k] = scales[n, k // G] * (codes[n, k] - zeros[n, k // G])``.
    """
    g = resolve_group_size(k, group_size)
    gen = torch.Generator().manual_seed(seed)
    top = 1 << bits
    codes = torch.randint(0, top, (n, k), generator=gen, dtype=torch.int64)
    log_scale = torch.empty(n, k // g).uniform_(-7.0, -3.3, generator=gen)
    scales = torch.exp2(log_scale).to(torch.bfloat16).to(torch.float32)
    if symmetric:
        zeros = torch.full((n, k // g), top // 2, dtype=torch.int64)
    else:
        zeros = torch.randint(1, top, (n, k // g), generator=gen, dtype=torch.int64)
    return codes, scales, zeros


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    *,
    scale_dtype: torch.dtype = torch.float32,
    min_zero: int = 0,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(codes, scales, zeros)`` of a float ``weight: [N, K]``, shaped as ``random_codes``.

    Per group (``G`` consecutive input columns): symmetric takes ``scale = max|w| / ((2^b - 1) / 2)`` and
    ``zero = 2^(b-1)`` (the GPTQ quantizer's and compressed-tensors' choice); asymmetric takes the range
    ``[min(w, 0), max(w, 0)]``, ``scale = range / (2^b - 1)``, ``zero = round(-min / scale)`` clamped to
    ``min_zero .. 2^b - 1`` (``min_zero=1`` for GPTQ v1). Then ``codes = clamp(round(w / scale) + zero)``.

    ``scales`` come back float32 but already rounded to ``scale_dtype`` (the dtype the format stores them
    in), and the codes are computed against the rounded scale, so ``dequantize`` of the triple is exactly
    what the stored checkpoint encodes.

    ``perm`` (GPTQ ``desc_act``): groups are formed over the permuted columns, group ``g`` being columns
    ``perm[g*G : (g+1)*G]``; ``codes`` still come back in the original column order and ``scales`` /
    ``zeros`` indexed by group, to be read through ``gptq_g_idx(K, group_size, perm)``.
    """
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    g = resolve_group_size(k, group_size)
    if perm is not None:
        w = w[:, perm]
    maxq = (1 << bits) - 1
    grouped = w.reshape(n, k // g, g)
    if symmetric:
        scales = grouped.abs().amax(-1) / (maxq / 2)
        zeros = torch.full((n, k // g), (maxq + 1) // 2, dtype=torch.int64)
    else:
        lo = grouped.amin(-1).clamp(max=0.0)
        hi = grouped.amax(-1).clamp(min=0.0)
        scales = (hi - lo) / maxq
    # an all-zero group: any positive scale reproduces it; 1.0 keeps codes == zero
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).to(scale_dtype).to(torch.float32)
    if not symmetric:
        zeros = torch.round(-lo / scales).clamp(min_zero, maxq).to(torch.int64)
    codes = torch.round(grouped / scales[..., None]) + zeros[..., None]
    codes = codes.clamp(0, maxq).to(torch.int64).reshape(n, k)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w[n, k] = scales[n, g] * (codes[n, k] - zeros[n, g])`` in float32, ``g = k // G`` or ``g_idx[k]``."""
    k = codes.shape[1]
    if g_idx is None:
        g_idx = torch.arange(k) // resolve_group_size(k, group_size)
    g_idx = g_idx.long()
    return scales.to(torch.float32)[:, g_idx] * (codes - zeros[:, g_idx]).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``values`` (each ``< 2^bits``) along ``dim`` into int32 words, LSB first, densely.

    Along ``dim``, value ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of a bit stream that fills words
    from bit 0 upward; a value may straddle two words when ``32 % bits != 0``. The run is zero-padded to
    a whole number of words, so the packed length is ``ceil(len * bits / 32)``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = values.to(torch.int64).movedim(dim, -1)
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"values must lie in 0..{(1 << bits) - 1} to pack into {bits} bits")
    length = v.shape[-1]
    words = -(-length * bits // 32)
    stream = (v[..., None] >> torch.arange(bits)) & 1  # [..., len, bits]: bit j of value i
    stream = stream.flatten(-2)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - stream.shape[-1]))
    packed = (stream.reshape(*stream.shape[:-1], words, 32) << torch.arange(32)).sum(-1)
    return _to_int32(packed).movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, length: int, dim: int = -1) -> torch.Tensor:
    """Inverse of ``pack_bits``: int64 values, ``length`` of them along ``dim``."""
    p = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    stream = ((p[..., None] >> torch.arange(32)) & 1).flatten(-2)[..., : length * bits]
    values = (stream.reshape(*stream.shape[:-1], length, bits) << torch.arange(bits)).sum(-1)
    return values.movedim(-1, dim).contiguous()


# --------------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------------


def gptq_g_idx(k: int, group_size: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's ``g_idx: int32 [K]``, the group whose scale and zero input column ``k`` uses.

    Without act-order, ``g_idx[k] = k // G``. With ``desc_act`` AutoGPTQ quantizes the columns in the
    order ``perm`` (``argsort(diag(H), descending=True)``), group ``g`` being columns ``perm[g*G:(g+1)*G]``,
    then stores ``g_idx = (arange(K) // G)[argsort(perm)]``, i.e. ``g_idx[perm[j]] = j // G``; the weight
    itself stays in the original column order.
    """
    g = resolve_group_size(k, group_size)
    position = torch.arange(k) if perm is None else torch.argsort(perm)
    return (position // g).to(torch.int32)


def pack_gptq(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    perm: torch.Tensor | None = None,
    v1_zero_offset: bool = True,
) -> dict[str, torch.Tensor]:
    """GPTQ tensors for one Linear, as AutoGPTQ / GPTQModel save ``checkpoint_format="gptq"``.

    Inputs as ``random_codes`` / ``quantize_rtn``: ``codes [N, K]``, ``scales`` and ``zeros [N, K/G]``
    indexed by group (with ``desc_act``, the groups of ``quantize_rtn(..., perm=perm)``).

    Returns (names are the module's: ``<prefix>.qweight`` etc.)::

        qweight  int32    [K*b/32, N]    codes.T packed along K: word r of column n holds k = r*32/b ..
        qzeros   int32    [K/G, N*b/32]  (zeros - 1).T packed along N   (v1; zeros.T when v1_zero_offset=False,
                                          which is GPTQModel's internal "gptq_v2")
        scales   float16  [K/G, N]       scales.T
        g_idx    int32    [K]            gptq_g_idx(K, group_size, perm if desc_act else None)

    v1 stores ``zero - 1`` (a historical off-by-one every v1 loader undoes with ``+ 1``), so a zero of 0
    cannot be stored; it raises rather than write the ``-1`` that real v1 asym checkpoints wrap to 15.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs {GPTQ_BITS} bits, got {bits}")
    n, k = codes.shape
    # AutoGPTQ sizes both as `features // 32 * bits`, i.e. it needs K and N multiples of 32
    if k % 32 or (n * bits) % 32:
        raise ValueError(f"GPTQ needs in_features % 32 == 0 and out_features * bits % 32 == 0; got [{n}, {k}]")
    if desc_act and perm is None:
        raise ValueError("desc_act=True needs the column order `perm` the groups were formed in")
    g_idx = gptq_g_idx(k, group_size, perm if desc_act else None)
    stored_zeros = zeros.to(torch.int64)
    if v1_zero_offset:
        if (stored_zeros < 1).any():
            raise ValueError("GPTQ v1 stores zero - 1, so a zero point of 0 cannot be represented")
        stored_zeros = stored_zeros - 1
    return {
        "qweight": pack_bits(codes.t(), bits, dim=0),
        "qzeros": pack_bits(stored_zeros.t(), bits, dim=1),
        "scales": scales.t().to(torch.float16).contiguous(),
        "g_idx": g_idx,
    }


def gptq_quantization_config(
    bits: int, group_size: int, symmetric: bool, desc_act: bool, skipped: list[str] | None = None
) -> dict[str, Any]:
    """``quantization_config`` of a GPTQ v1 checkpoint: AutoGPTQ's fields plus GPTQModel's ``pack_dtype``.

    ``checkpoint_format`` is the legacy key transformers still reads (``format`` is its new name); both say
    ``"gptq"`` = v1. Modules left unquantized inside the blocks are named GPTQModel's way, as negative
    ``dynamic`` rules (``"-:<regex>": {}``).
    """
    config: dict[str, Any] = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": symmetric,
        "true_sequential": True,
        "lm_head": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
    }
    if skipped:
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in skipped}
    return config


# --------------------------------------------------------------------------------------------------
# AWQ
# --------------------------------------------------------------------------------------------------


def _awq_interleave(values: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` -> the same, each block of 8 columns reordered to AWQ_PACK_ORDER before packing."""
    if values.shape[-1] % 8:
        raise ValueError(f"AWQ packs out_features in blocks of 8, got {values.shape[-1]}")
    blocks = values.reshape(*values.shape[:-1], -1, 8)
    return blocks[..., list(AWQ_PACK_ORDER)].reshape(values.shape)


def pack_awq(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors (AutoAWQ ``WQLinear_GEMM``, ``version: "gemm"``) for one 4-bit Linear.

    Returns::

        qweight  int32    [K, N/8]    codes.T packed along N: nibble i of word j = column 8*j + AWQ_PACK_ORDER[i]
        qzeros   int32    [K/G, N/8]  zeros.T, packed the same way; stored as is (no v1-style offset)
        scales   float16  [K/G, N]    scales.T

    No ``g_idx``: AWQ groups are always consecutive input columns.
    """
    n, k = codes.shape
    resolve_group_size(k, group_size)
    if (codes.max() > 15) or (zeros.max() > 15):
        raise ValueError("AWQ GEMM is 4-bit only")
    return {
        "qweight": pack_bits(_awq_interleave(codes.t()), 4, dim=1),
        "qzeros": pack_bits(_awq_interleave(zeros.t()), 4, dim=1),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def awq_quantization_config(group_size: int, modules_to_not_convert: list[str] | None = None) -> dict[str, Any]:
    """``quantization_config`` as AutoAWQ writes it (transformers' ``AwqConfig`` reads ``version`` as format)."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert or None,
    }


# --------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# --------------------------------------------------------------------------------------------------


def pack_compressed_tensors(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors for one Linear (``PackedQuantizationCompressor``).

    The library quantizes to signed ``q = codes - 2^(b-1)`` in ``[-2^(b-1), 2^(b-1) - 1]`` (int8) with a
    signed zero point ``zp = zeros - 2^(b-1)`` (0 when symmetric), and ``pack_to_int32`` adds ``2^(b-1)``
    back before packing: the stored bits are the unsigned ``codes`` / ``zeros``. Dequant is
    ``(q - zp) * scale``, the same value as ``(codes - zeros) * scale``.

    Returns::

        weight_packed      int32        [N, ceil(K*b/32)]   codes packed along K (dense, LSB first)
        weight_scale       scale_dtype  [N, K/G]            [N, 1] when group_size == -1 ("channel")
        weight_zero_point  int32        [ceil(N*b/32), K/G] zeros packed along N (packed_dim=0); asym only
        weight_shape       int64        [2]                 [N, K]

    llmcompressor writes the scale in the dtype of the model it quantized (bfloat16 for most hub models);
    the library and transformers accept any float dtype and dequantize in it.
    """
    n, k = codes.shape
    resolve_group_size(k, group_size)
    offset = 1 << (bits - 1)
    if symmetric and (zeros != offset).any():
        raise ValueError(f"symmetric compressed-tensors needs zeros == {offset} (signed zero point 0)")
    out = {
        "weight_packed": pack_bits(codes, bits, dim=1),
        "weight_scale": scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_bits(zeros, bits, dim=0)
    return out


def compressed_tensors_quantization_config(
    bits: int, group_size: int, symmetric: bool, ignore: list[str]
) -> dict[str, Any]:
    """``quantization_config`` shaped as llmcompressor saves a W{bits}A16 model (``ModelCompressor.update_config``).

    One config group targeting class ``Linear``; ``ignore`` holds module names (``lm_head`` and anything
    else left dense). ``strategy`` is ``"group"`` with ``group_size``, or ``"channel"`` with ``group_size``
    null for ``-1``. ``format`` is given both model-wide and per group, as recent llmcompressor does.
    """
    channel = group_size == -1
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": None if channel else group_size,
        "num_bits": bits,
        "observer": "minmax",
        "observer_kwargs": {},
        "strategy": "channel" if channel else "group",
        "symmetric": symmetric,
        "type": "int",
    }
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


# --------------------------------------------------------------------------------------------------
# compressed-tensors int-quantized (W8A8)
# --------------------------------------------------------------------------------------------------


def pack_int_quantized(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """compressed-tensors ``int-quantized`` tensors for one symmetric 8-bit Linear (``IntQuantizationCompressor``,
    i.e. ``NaiveQuantizationCompressor``: the weight is quantized to ``torch.int8`` and stored unpacked).

    The library's symmetric int8 weight is ``q = clamp(round(w / scale), -128, 127)`` with its minmax
    observer's ``scale = max|w| / 127.5`` per row (channel) or per group (``calculate_qparams``: half the range
    ``127 - (-128)``), which is ``quantize_rtn(w, 8, group_size, True)`` with ``q = codes - 128``.

    Returns::

        weight        int8         [N, K]    codes - 128
        weight_scale  scale_dtype  [N, K/G]  [N, 1] for strategy "channel"

    No ``weight_zero_point``: the library removes a symmetric scheme's (all-zero) zero point before saving.
    """
    n, k = codes.shape
    resolve_group_size(k, group_size)
    if (zeros != 128).any() or codes.min() < 0 or codes.max() > 255:
        raise ValueError("int-quantized is symmetric 8-bit here: zeros == 128, codes in 0..255")
    return {
        "weight": (codes - 128).to(torch.int8).contiguous(),
        "weight_scale": scales.to(scale_dtype).contiguous(),
    }


INT8_DYNAMIC_TOKEN = {
    "dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True, "type": "int",
}  # fmt: skip
"""``input_activations`` of compressed-tensors' ``W8A8`` preset (``INT8_W8A8``) as the library serializes it."""


def int_quantized_quantization_config(
    group_size: int, ignore: list[str], input_activations: dict[str, Any] | None = INT8_DYNAMIC_TOKEN
) -> dict[str, Any]:
    """``quantization_config`` of a W8A8 ``int-quantized`` checkpoint, key for key as compressed-tensors 0.20.1
    writes it (``ModelCompressor.update_config`` after compressing a model under the ``W8A8`` preset with
    ``ignore=["lm_head"]``, captured once and copied here): weights int8 symmetric, ``strategy`` "channel" (the
    preset's) or "group"; ``input_activations`` dynamic per-token int8; ``format`` model-wide and per group."""
    channel = group_size == -1
    weights = {
        "dynamic": False,
        "group_size": None if channel else group_size,
        "num_bits": 8,
        "strategy": "channel" if channel else "group",
        "symmetric": True,
        "type": "int",
    }
    return {
        "config_groups": {
            "group_0": {
                "format": "int-quantized",
                "input_activations": None if input_activations is None else dict(input_activations),
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "int-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _read_tensors(src: pathlib.Path) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``[(file name, tensors)]`` of every safetensors shard in ``src``, in file order."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    return [(f.name, load_file(f)) for f in files]


def _write_tensors(dst: pathlib.Path, shards: list[tuple[str, dict[str, torch.Tensor]]], indexed: bool) -> None:
    """Save the shards under their names; rebuild ``model.safetensors.index.json`` when the source had one."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in shards:
        save_file({k: v.contiguous() for k, v in tensors.items()}, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
    if indexed:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Everything but weights, their index and config.json: tokenizer files, generation_config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    rewritten = {"config.json", "model.safetensors.index.json"}
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in rewritten:
            shutil.copy2(f, dst / f.name)


def write_quantized_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    fmt: str,
    bits: int,
    group_size: int,
    symmetric: bool,
    desc_act: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
    seed: int = 0,
    *,
    ct_scale_dtype: torch.dtype = torch.float32,
) -> tuple[pathlib.Path, pathlib.Path]:
    """RTN-quantize a ``build_checkpoint`` model into ``fmt`` at ``dst_dir``; return ``(dst_dir, dequantized_dir)``.

    ``fmt`` is ``"gptq"`` (v1; ``bits`` in 2/3/4/8, ``desc_act`` allowed), ``"awq"`` (GEMM, ``bits`` 4),
    ``"compressed-tensors"`` (pack-quantized, ``bits`` 1..8, scales in ``ct_scale_dtype``) or
    ``"int-quantized"`` (compressed-tensors W8A8: ``bits`` 8, symmetric, scales in ``ct_scale_dtype``).

    Quantized: the Linear weights of ``model.layers.*`` (``q/k/v/o_proj``, ``gate/up/down_proj``, and each
    expert's of a mixture-of-experts model, see :data:`QUANTIZED_MODULE`) whose module name contains none of the
    ``skip`` strings. Stacked expert tensors (``mlp.experts.gate_up_proj``) are no Linear's and stay float. Each ``<module>.weight`` is replaced by the
    format's tensors (``<module>.qweight`` ... or ``<module>.weight_packed`` ...); biases, norms,
    embeddings and ``lm_head`` are copied unchanged (source dtype). Shard layout follows the source.
    ``config.json`` gains ``quantization_config`` (GPTQ also gets AutoGPTQ's ``quantize_config.json``);
    tokenizer and generation files are copied.

    ``dst_dir/dequantized/`` is the same model with each quantized weight replaced by the float32 weight
    it encodes (scales already rounded to the stored dtype), no ``quantization_config``: the oracle.
    With ``desc_act`` each input's column order is a random permutation seeded by ``seed``, shared by the
    projections that read that input (q/k/v, gate/up), as GPTQ's act order is (they share its Hessian).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "awq" and bits != 4:
        raise ValueError("AWQ GEMM is 4-bit only")
    if desc_act and fmt != "gptq":
        raise ValueError("desc_act (act-order g_idx) is a GPTQ feature here")
    if fmt == "int-quantized" and (bits != 8 or not symmetric):
        raise ValueError("int-quantized (W8A8) is symmetric 8-bit here")
    src, dst = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    deq_dir = dst / "dequantized"
    config = json.loads((src / "config.json").read_text())
    indexed = (src / "model.safetensors.index.json").is_file()
    gen = torch.Generator().manual_seed(seed)
    scale_dtype = ct_scale_dtype if fmt in ("compressed-tensors", "int-quantized") else torch.float16

    quant_shards: list[tuple[str, dict[str, torch.Tensor]]] = []
    deq_shards: list[tuple[str, dict[str, torch.Tensor]]] = []
    skipped: list[str] = []
    routers: set[str] = set()
    shared_perms: dict[tuple[str, str], torch.Tensor] = {}
    for file_name, tensors in _read_tensors(src):
        quant: dict[str, torch.Tensor] = {}
        deq: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if m := ROUTER.match(name):
                routers.add(m[1])
            module, _, leaf = name.rpartition(".")
            if leaf != "weight" or not QUANTIZED_MODULE.match(module):
                quant[name] = deq[name] = tensor
                continue
            if any(s in module for s in skip):
                skipped.append(module)
                quant[name] = deq[name] = tensor
                continue
            k = tensor.shape[1]
            # Projections that read the same input (q/k/v; gate/up) share GPTQ's Hessian, hence its act order.
            parent, _, proj = module.rpartition(".")
            input_key = (parent, {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(proj, proj))
            if desc_act and input_key not in shared_perms:
                shared_perms[input_key] = torch.randperm(k, generator=gen)
            perm = shared_perms[input_key] if desc_act else None
            codes, scales, zeros = quantize_rtn(
                tensor,
                bits,
                group_size,
                symmetric,
                scale_dtype=scale_dtype,
                min_zero=1 if fmt == "gptq" else 0,
                perm=perm,
            )
            if fmt == "gptq":
                packed = pack_gptq(codes, scales, zeros, bits, group_size, desc_act=desc_act, perm=perm)
                g_idx = packed["g_idx"]
            elif fmt == "awq":
                packed, g_idx = pack_awq(codes, scales, zeros, group_size), None
            elif fmt == "int-quantized":
                packed, g_idx = pack_int_quantized(codes, scales, zeros, group_size, scale_dtype), None
            else:
                packed = pack_compressed_tensors(codes, scales, zeros, bits, group_size, symmetric, scale_dtype)
                g_idx = None
            quant.update({f"{module}.{key}": value for key, value in packed.items()})
            deq[name] = dequantize(codes, scales, zeros, group_size, g_idx=g_idx)
        quant_shards.append((file_name, quant))
        deq_shards.append((file_name, deq))
    skipped.sort()

    # llmcompressor's MoE examples ignore the routers by regex: ["lm_head", "re:.*mlp.gate$"] (Mixtral's
    # "re:.*block_sparse_moe.gate$").
    ct_ignore = ["lm_head", *skipped, *(f"re:.*{block}.gate$" for block in sorted(routers))]
    if fmt == "gptq":
        qconfig = gptq_quantization_config(bits, group_size, symmetric, desc_act, skipped)
    elif fmt == "awq":
        qconfig = awq_quantization_config(group_size, sorted({s for s in skip if s != "lm_head"}) or None)
    elif fmt == "int-quantized":
        qconfig = int_quantized_quantization_config(group_size, ct_ignore)
    else:
        # targets "Linear" covers lm_head too, which stays dense here whatever `skip` says
        qconfig = compressed_tensors_quantization_config(bits, group_size, symmetric, ct_ignore)

    for out_dir, shards, cfg in (
        (dst, quant_shards, {**config, "quantization_config": qconfig}),
        (deq_dir, deq_shards, config),
    ):
        _copy_side_files(src, out_dir)
        _write_tensors(out_dir, shards, indexed)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if fmt == "gptq":
        (dst / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    return dst, deq_dir
