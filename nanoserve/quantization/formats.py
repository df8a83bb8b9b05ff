"""The hub's low-bit checkpoint formats, unpacked to one canonical form per linear weight (or fused part):
unsigned integer codes [N, K], scales [N, groups], zero points [N, groups] (None when symmetric), and for GPTQ
act-order the group of each input column. ``layout.write_rows`` then stores them in nanoserve's layout.

The formats, as their writers define them (``w[n, k] = scale[n, g] * (code[n, k] - zero[n, g])``):

* GPTQ (AutoGPTQ / GPTQModel): ``qweight`` int32 [K*b/32, N] packed along K, ``qzeros`` int32
  [groups, N*b/32] packed along N, ``scales`` [groups, N], ``g_idx`` int32 [K] (group of each column; act-order
  checkpoints permute it). ``checkpoint_format`` "gptq" (v1) stores zero - 1.
* AWQ GEMM: ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [groups, N/8] packed along N, nibble i of a word
  holding column ``8j + (0, 2, 4, 6, 1, 3, 5, 7)[i]``; ``scales`` [groups, N]. 4 bits, zeros stored as they are.
* compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [N, K*b/32] packed along K (the stored bits
  are the unsigned codes), ``weight_scale`` [N, groups], ``weight_zero_point`` int32 [N*b/32, groups] packed
  along N (asymmetric only), ``weight_shape`` [2].
* compressed-tensors ``int-quantized`` (W8A8, symmetric): ``weight`` int8 [N, K], the signed codes
  ``q = code - 128`` unpacked; ``weight_scale`` [N, groups] ([N, 1] for strategy "channel"), float in the
  checkpoint's dtype; ``weight_zero_point`` [N, groups], absent or all zero (compressed-tensors >= 0.12 drops it
  for symmetric schemes, older versions wrote zeros).

Bits within a word fill from the least significant end, value i at bits [i*b, (i+1)*b).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# (required, optional) tensor name suffixes of one linear weight, by format.
SUFFIXES = {
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",)),
    "awq": (("qweight", "qzeros", "scales"), ()),
    # weight_shape sorts after weight_packed/weight_scale, so it is required: a part is complete when it arrives.
    "compressed-tensors": (("weight_packed", "weight_scale", "weight_shape"), ("weight_zero_point",)),
    # weight_zero_point (symmetric: zeros) may arrive after the part is complete; check_zero_points reads it.
    "int-quantized": (("weight", "weight_scale"), ("weight_zero_point",)),
}


@dataclass
class Unpacked:
    codes: torch.Tensor  # [N, K] int16, unsigned values
    scales: torch.Tensor  # [N, groups] float32
    zeros: torch.Tensor | None  # [N, groups] float32, unsigned frame; None: symmetric (2^(b-1))
    g_idx: torch.Tensor | None = None  # [K] int64 when columns are not in group order (GPTQ act-order)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Values of ``bits`` bits packed into int32 words along ``dim`` -> int16 tensor with ``length`` values
    along that dim. ``order[i]``: which value of a word's group sits in its i-th field (AWQ's interleave)."""
    per_word = 32 // bits
    if bits in (4, 8) and sys.byteorder == "little" and packed.dtype == torch.int32:
        # Fields that fill whole bytes: a word's bytes, low first, hold its values in order (two per byte at 4
        # bits, low nibble first). Read in uint8: a fifth of the time of widening every word to int64.
        raw = packed.movedim(dim, -1).contiguous().view(torch.uint8)  # [..., words * 4]
        fields = torch.stack((raw & 15, raw >> 4), dim=-1) if bits == 4 else raw
        fields = fields.reshape(*raw.shape[:-1], -1, per_word)  # [..., words, per_word]
    else:
        words = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
        shifts = torch.arange(per_word, dtype=torch.int64) * bits
        fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, per_word]
    if order is not None:
        fields = fields[..., torch.argsort(torch.tensor(order))]
    values = fields.flatten(-2)
    if values.shape[-1] < length:
        raise ValueError(f"packed tensor holds {values.shape[-1]} values along dim {dim}, need {length}")
    return values[..., :length].to(torch.int16).movedim(-1, dim)


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input size {in_features}")
    return in_features // group_size


def check_zero_points(name: str, zeros: torch.Tensor, out_features: int, in_features: int, group_size: int) -> None:
    """An int-quantized (symmetric) weight's stored zero points: [N, groups] of signed zeros, nothing else."""
    _expect(name, zeros, (out_features, _groups(in_features, group_size)))
    if zeros.is_floating_point() or torch.any(zeros != 0):
        raise ValueError(f"{name}: the config says symmetric, but zero points other than integer 0 are stored")


def _symmetric_or_zeros(zeros: torch.Tensor, bits: int, symmetric: bool, name: str) -> torch.Tensor | None:
    if not symmetric:
        return zeros.to(torch.float32)
    implied = 1 << (bits - 1)
    if not torch.all(zeros == implied):
        raise ValueError(f"{name}: the config says symmetric, but zero points other than {implied} are stored")
    return None


def unpack(
    fmt: str, tensors: dict[str, torch.Tensor], name: str, out_features: int, in_features: int, bits: int,
    group_size: int, symmetric: bool, gptq_zero_offset: int = 1,
) -> Unpacked:  # fmt: skip
    """One weight's checkpoint tensors (by suffix) -> :class:`Unpacked`, every shape checked against the
    [out_features, in_features] weight the model expects (errors name the tensor ``name.suffix``)."""
    n, k = out_features, in_features
    groups = _groups(k, group_size)
    if fmt == "gptq":
        _expect(f"{name}.qweight", tensors["qweight"], (k * bits // 32, n))
        _expect(f"{name}.qzeros", tensors["qzeros"], (groups, -(-n * bits // 32)))
        _expect(f"{name}.scales", tensors["scales"], (groups, n))
        codes = unpack_int32(tensors["qweight"], bits, k, dim=0).T
        zeros = unpack_int32(tensors["qzeros"], bits, n, dim=1).T.to(torch.int32) + gptq_zero_offset
        g_idx = None
        if "g_idx" in tensors:
            _expect(f"{name}.g_idx", tensors["g_idx"], (k,))
            g_idx = tensors["g_idx"].to(torch.int64)
            trivial = torch.arange(k) // (k if group_size == -1 else group_size)
            if torch.equal(g_idx, trivial):
                g_idx = None
            elif g_idx.min() < 0 or g_idx.max() >= groups:
                raise ValueError(f"{name}.g_idx: group indices outside 0..{groups - 1}")
        return Unpacked(
            codes.contiguous(), tensors["scales"].T.to(torch.float32).contiguous(),
            _symmetric_or_zeros(zeros, bits, symmetric, f"{name}.qzeros"), g_idx,
        )  # fmt: skip
    if fmt == "awq":
        _expect(f"{name}.qweight", tensors["qweight"], (k, n // 8))
        _expect(f"{name}.qzeros", tensors["qzeros"], (groups, n // 8))
        _expect(f"{name}.scales", tensors["scales"], (groups, n))
        if n % 8:
            raise ValueError(f"{name}: AWQ packs 8 outputs per word; {n} outputs is not a multiple of 8")
        codes = unpack_int32(tensors["qweight"], 4, n, dim=1, order=AWQ_ORDER).T
        zeros = unpack_int32(tensors["qzeros"], 4, n, dim=1, order=AWQ_ORDER).T
        return Unpacked(
            codes.contiguous(), tensors["scales"].T.to(torch.float32).contiguous(),
            _symmetric_or_zeros(zeros, 4, symmetric, f"{name}.qzeros"),
        )  # fmt: skip
    if fmt == "compressed-tensors":
        if "weight_shape" in tensors and [int(v) for v in tensors["weight_shape"].flatten()] != [n, k]:
            raise ValueError(f"{name}.weight_shape: {tensors['weight_shape'].tolist()}, expected {[n, k]}")
        _expect(f"{name}.weight_packed", tensors["weight_packed"], (n, -(-k * bits // 32)))
        _expect(f"{name}.weight_scale", tensors["weight_scale"], (n, groups))
        codes = unpack_int32(tensors["weight_packed"], bits, k, dim=1)
        if symmetric:
            zeros = None
        else:
            if "weight_zero_point" not in tensors:
                raise ValueError(f"{name}.weight_zero_point: missing (the scheme is asymmetric)")
            zp = tensors["weight_zero_point"]
            _expect(f"{name}.weight_zero_point", zp, (-(-n * bits // 32), groups))
            zeros = unpack_int32(zp, bits, n, dim=0).to(torch.float32)
        return Unpacked(codes.contiguous(), tensors["weight_scale"].to(torch.float32).contiguous(), zeros)
    if fmt == "int-quantized":
        weight, scale = tensors["weight"], tensors["weight_scale"]
        if weight.dtype != torch.int8:
            raise ValueError(
                f"{name}.weight: dtype {weight.dtype}, expected torch.int8 (int-quantized stores int8 codes)"
            )
        _expect(f"{name}.weight", weight, (n, k))
        if not scale.is_floating_point():
            raise ValueError(f"{name}.weight_scale: dtype {scale.dtype}, expected a float type")
        _expect(f"{name}.weight_scale", scale, (n, groups))
        if bits != 8:
            raise ValueError(f"{name}: int-quantized weights of {bits} bits are not supported; supported: 8")
        codes = weight.to(torch.int16) + 128  # the unsigned frame, symmetric zero point 128
        return Unpacked(codes.contiguous(), scale.to(torch.float32).contiguous(), None)
    raise ValueError(f"unknown checkpoint format {fmt!r}")
