"""RMSNorm computed in float32 like the reference, with an optional fused residual add."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanoserve.layers import native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, kernels: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        # The C kernel library (nanoserve.layers.native) when it applies, else None: torch ops.
        self.kernels = kernels if native.norm_supported(hidden_size) else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        orig_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(orig_dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual) — the sum becomes the
        next residual, saving one pass over the activations per layer. The native path writes that sum into
        ``residual`` itself (callers pass a residual they own)."""
        if self.kernels is not None and x.dim() == 2:
            out = native.add_rms_norm(self.kernels, x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``norm(x) * (1 + w)`` with the product in float32, then cast to x's dtype (Llama casts
    first, then scales). ``1 + w`` is what the checkpoint's ``w`` is turned into as it loads, kept in float32
    whatever the model's dtype (as transformers computes it), so the multiplication, the residual add and the C
    kernel are RMSNorm's own."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, kernels: Any = None) -> None:
        super().__init__(hidden_size, eps, torch.float32, kernels if dtype == torch.float32 else None)
        self.weight.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        tensor = loaded[:]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
        param.data.copy_(1.0 + tensor.float())

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)
