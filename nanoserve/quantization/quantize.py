"""Round-to-nearest quantization of float weights (quantize on load), rows at a time."""

from __future__ import annotations

import torch

from nanoserve.quantization.config import WeightScheme

# Rows quantized per piece: a bf16 checkpoint tensor is widened to float32 a piece at a time, so loading never
# holds a float32 copy of a whole large tensor (a 152k x 4096 LM head would be 2.5 GB).
ROWS_PER_PIECE = 1024


def quantize(weight: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [n, K] unsigned, scales [n, groups], zeros [n, groups] or None when symmetric) such that
    ``scales * (codes - zeros)`` approximates ``weight`` [n, K], group-wise along K.

    Symmetric (zero point 2^(bits-1) implied): the scale maps the group's largest-magnitude value to the most
    negative code (-2^(bits-1)), so all 2^bits levels are used and that value is exact. Asymmetric: the group's
    [min, max] range (widened to include 0) spans codes 0..2^bits-1."""
    w = weight.to(torch.float32)
    n, k = w.shape
    group = k if scheme.group_size == -1 else scheme.group_size
    g = w.view(n, k // group, group)
    levels = (1 << scheme.bits) - 1
    half = 1 << (scheme.bits - 1)
    if not scheme.asymmetric:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        peak = g.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude
        scales = peak / -half
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        codes = torch.round(g / scales[..., None]).clamp(-half, half - 1) + half
        return codes.to(torch.int32).view(n, k), scales, None
    lo = g.amin(dim=-1).clamp(max=0)
    hi = g.amax(dim=-1).clamp(min=0)
    scales = (hi - lo) / levels
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    zeros = torch.round(-lo / scales).clamp(0, levels)
    codes = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, levels)
    return codes.to(torch.int32).view(n, k), scales, zeros
