"""nanoserve's own blocked layout for low-bit linear weights, and the arithmetic it stands for.

A weight ``W`` [N, K] is held as integer codes ``c`` with per-(row, group) scales ``s`` and zero points ``z``:
``W[n, k] = s[n, g] * (c[n, k] - z[n, g])`` with ``g = k // G`` (``G`` = K for per-channel weights). Codes are
unsigned: 0..15 for 4 bits, 0..255 for 8 bits; a symmetric weight has ``z`` = 8 (4 bits) or 128 (8 bits) and
stores no zero points.

The bytes, one buffer per weight (``uint8``), written once at load and read by the C kernels in
``nanoserve/layers/native_kernels.c`` in one sequential pass:

* rows in tiles of :data:`TILE_ROWS` (8: one SIMD register of outputs); the last tile is padded with zero rows;
* a tile is its groups in order, each a *record*: the 8 rows' scales (8 float32), then, if asymmetric, their
  ``s * z`` (8 float32), then the 8 rows' codes for the group in chunks of 32 ``k``: chunk 0 of rows 0..7,
  then chunk 1 of rows 0..7, ... (so the kernel's 8 row accumulators read one contiguous stream);
* 8-bit codes are stored as signed bytes ``c - 128`` (and their ``s * z`` as ``s * (z - 128)``), so a kernel
  computes every weight as ``s * stored - stored_sz``;
* 4-bit codes two to a byte, in runs of 16 ``k``: byte ``i`` of a run holds ``c[i]`` in its low nibble and
  ``c[i + 8]`` in its high one, so one 8-byte load widens into two vectors of 8 consecutive ``k``.

Why: the scales sit beside the codes they scale (no second stream to fetch), a record of 8 rows is what one
pass of the kernel consumes, and the 8 row results of a group reduce into one vector that the 8 scales
multiply directly. K is padded to a multiple of :data:`CHUNK` (32) for per-channel weights; group sizes must be
multiples of 32 that divide K.

The functions here are the reference: :func:`dequantize` reads a packed buffer back to float32, and
:func:`reference_linear` computes what the kernels compute (with int8 activations, the same rounding), in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoserve import platform

TILE_ROWS = 8
CHUNK = 32
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class PackedShape:
    """What a kernel needs to know of a packed weight besides its address."""

    out_features: int  # N
    in_features: int  # K as the model sees it
    bits: int
    group_size: int  # along K, in the padded K (== padded_in for per-channel)
    asymmetric: bool

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bits {self.bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size % CHUNK or self.padded_in % self.group_size:
            raise ValueError(f"group size {self.group_size} must be a multiple of {CHUNK} dividing K={self.padded_in}")

    @staticmethod
    def create(out_features: int, in_features: int, bits: int, group_size: int, asymmetric: bool) -> PackedShape:
        """``group_size`` -1 means one group per row (K padded to a multiple of 32); otherwise it must divide K."""
        if group_size == -1 or group_size == in_features:
            group_size = -(-in_features // CHUNK) * CHUNK
        elif in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide the input size {in_features}")
        elif group_size % CHUNK:
            raise ValueError(f"group size {group_size} is not supported; use a multiple of {CHUNK} (32, 64, 128)")
        return PackedShape(out_features, in_features, bits, group_size, asymmetric)

    @property
    def padded_in(self) -> int:
        return -(-self.in_features // CHUNK) * CHUNK

    @property
    def num_groups(self) -> int:
        return self.padded_in // self.group_size

    @property
    def num_tiles(self) -> int:
        return -(-self.out_features // TILE_ROWS)

    @property
    def header_bytes(self) -> int:
        return TILE_ROWS * 4 * (2 if self.asymmetric else 1)

    @property
    def row_group_bytes(self) -> int:
        return self.group_size * self.bits // 8

    @property
    def record_bytes(self) -> int:
        return self.header_bytes + TILE_ROWS * self.row_group_bytes

    @property
    def nbytes(self) -> int:
        return self.num_tiles * self.num_groups * self.record_bytes

    @property
    def implied_zero(self) -> int:
        """The zero point of a symmetric weight, in the unsigned frame of the codes."""
        return 1 << (self.bits - 1)

    @property
    def code_offset(self) -> int:
        """What is subtracted from a code before it is stored (8-bit codes are stored signed)."""
        return 128 if self.bits == 8 else 0


def allocate(shape: PackedShape, device: torch.device | str | None = None) -> torch.Tensor:
    """A zeroed buffer for ``shape`` (padding rows stay zero: scale 0, so they produce 0); on the host, in huge
    pages where it can be (decode streams it whole every step; see ``platform.host_zeros``)."""
    if device is None or torch.device(device).type == "cpu":
        return platform.host_zeros(shape.nbytes)
    return torch.zeros(shape.nbytes, dtype=torch.uint8, device=device)


def _views(buf: torch.Tensor, shape: PackedShape) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    records = buf.view(shape.num_tiles, shape.num_groups, shape.record_bytes)
    scales = records[:, :, : TILE_ROWS * 4].view(torch.float32)  # [T, G#, 8]
    mins = records[:, :, TILE_ROWS * 4 : 2 * TILE_ROWS * 4].view(torch.float32) if shape.asymmetric else None
    chunk = CHUNK * shape.bits // 8
    codes = records[:, :, shape.header_bytes :].unflatten(-1, (shape.group_size // CHUNK, TILE_ROWS, chunk))
    codes = codes.transpose(-3, -2)  # [T, G#, 8 rows, chunks, chunk bytes] (a view; chunk-major in memory)
    return scales, mins, codes


def _encode(codes: torch.Tensor, shape: PackedShape) -> torch.Tensor:
    """[n, padded K] unsigned codes -> [n, groups, row_group_bytes] bytes in the layout's order."""
    n = codes.shape[0]
    if shape.bits == 8:
        return (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8).view(n, shape.num_groups, -1)
    chunks = codes.to(torch.uint8).view(n, shape.padded_in // 16, 2, 8)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).view(n, shape.num_groups, -1)


def _decode(data: torch.Tensor, shape: PackedShape) -> torch.Tensor:
    """Inverse of :func:`_encode`: [n, groups, row_group_bytes] -> [n, padded K] stored codes (int32; signed
    for 8 bits)."""
    n = data.shape[0]
    if shape.bits == 8:
        return data.reshape(n, -1).view(torch.int8).to(torch.int32)
    raw = data.reshape(n, -1, 8).to(torch.int32)
    return torch.stack((raw & 15, raw >> 4), dim=2).reshape(n, -1)


def write_rows(
    buf: torch.Tensor, shape: PackedShape, row_start: int, codes: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor | None,
) -> None:  # fmt: skip
    """Store rows ``[row_start, row_start + n)``: ``codes`` [n, K] unsigned integers, ``scales`` and ``zeros``
    [n, groups] (``zeros`` in the codes' frame, None when symmetric). Rows are independent, so a fused layer's
    parts (q, k, v) and a rank's slice arrive one piece at a time, each quantized and stored as it is read."""
    n = codes.shape[0]
    if codes.shape[1] != shape.in_features or tuple(scales.shape) != (n, shape.num_groups):
        raise ValueError(
            f"packed rows: codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not fit a [{shape.out_features}, "
            f"{shape.in_features}] weight with {shape.num_groups} groups"
        )
    if (zeros is not None) != shape.asymmetric:
        raise ValueError("packed rows: zero points must be given exactly for asymmetric weights")
    if row_start < 0 or row_start + n > shape.out_features:
        raise ValueError(f"packed rows [{row_start}, {row_start + n}) outside 0..{shape.out_features}")
    if shape.padded_in != shape.in_features:  # pad K with codes equal to the zero point: weight 0 there
        pad = (zeros[:, -1:] if zeros is not None else torch.full((n, 1), shape.implied_zero)).round().to(codes.dtype)
        codes = torch.cat([codes, pad.expand(n, shape.padded_in - shape.in_features)], dim=1)
    scales_v, mins_v, codes_v = _views(buf, shape)
    rows = torch.arange(row_start, row_start + n)
    tiles, lanes = rows // TILE_ROWS, rows % TILE_ROWS
    groups = torch.arange(shape.num_groups)
    scales_v[tiles[:, None], groups[None, :], lanes[:, None]] = scales.to(torch.float32)
    if mins_v is not None:
        stored_zeros = zeros.to(torch.float32) - shape.code_offset
        mins_v[tiles[:, None], groups[None, :], lanes[:, None]] = scales.to(torch.float32) * stored_zeros
    codes_v[tiles, :, lanes] = _encode(codes, shape).unflatten(-1, (shape.group_size // CHUNK, -1))


def unpack(buf: torch.Tensor, shape: PackedShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stored codes [N, padded K] int32, scales [N, groups], stored s*z [N, groups]) read back from a packed
    buffer: the weight is ``scale * code - sz`` (8-bit codes and their zeros are in the signed frame)."""
    scales_v, mins_v, codes_v = _views(buf, shape)
    n = shape.out_features
    scales = scales_v.permute(0, 2, 1).reshape(-1, shape.num_groups)[:n]
    if mins_v is not None:
        mins = mins_v.permute(0, 2, 1).reshape(-1, shape.num_groups)[:n]
    else:
        mins = scales * (shape.implied_zero - shape.code_offset)
    codes = _decode(codes_v.permute(0, 2, 1, 3, 4).reshape(-1, shape.num_groups, shape.row_group_bytes)[:n], shape)
    return codes, scales, mins


def dequantize(buf: torch.Tensor, shape: PackedShape) -> torch.Tensor:
    """The float32 weight [N, K] a packed buffer stands for: ``s * c - s * z`` per element."""
    codes, scales, mins = unpack(buf, shape)
    g = shape.group_size
    w = codes.view(shape.out_features, shape.num_groups, g).to(torch.float32) * scales[:, :, None] - mins[:, :, None]
    return w.reshape(shape.out_features, shape.padded_in)[:, : shape.in_features]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: (codes [M, K] in -127..127, scale [M]) with x ~ scale * codes. The kernel
    rounds ``x * (127 / max|x|)`` to nearest-even, as here; a zero row gets scale 1."""
    amax = x.abs().amax(dim=1)
    # torch.full_like(...) / amax: one correctly rounded division, as the kernel's 127.f / amax (a Python scalar
    # over a tensor becomes reciprocal-then-multiply, two roundings, which moves ties to another code).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.ones_like(amax))
    codes = torch.round(x * inv[:, None]).clamp(-127, 127)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return codes, scale


def reference_linear(
    x: torch.Tensor, buf: torch.Tensor, shape: PackedShape, bias: torch.Tensor | None = None,
    int8_activations: bool = False,
) -> torch.Tensor:  # fmt: skip
    """What the kernels compute, in float64 torch (so only the kernels' summation order differs): x [M, K]
    against the packed weight. With ``int8_activations`` the rows of x are first rounded to per-token int8
    (:func:`quantize_activations`) and the dot products are exact integers, as in the kernel."""
    if not int8_activations:
        y = x.double() @ dequantize(buf, shape).double().T
    else:
        codes, scales, mins = unpack(buf, shape)
        xq, sx = quantize_activations(x.float())
        m, g = x.shape[0], shape.group_size
        xq = torch.nn.functional.pad(xq, (0, shape.padded_in - shape.in_features)).double()
        xg = xq.view(m, shape.num_groups, g)
        wg = codes.double().view(shape.out_features, shape.num_groups, g)
        dots = torch.einsum("mgk,ngk->mng", xg, wg)  # exact: integers below 2^53
        y = (dots * scales.double() - xg.sum(-1)[:, None, :] * mins.double()).sum(-1) * sx.double()[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
