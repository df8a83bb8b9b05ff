"""The tensor-parallel group a layer belongs to, passed explicitly to every parallel layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Rank and size of this process in its tensor-parallel group; collectives are no-ops at size 1.

    ``group`` carries the model's tensors (gloo on CPU, NCCL on CUDA); ``cpu_group`` is always gloo and
    carries small control data such as the KV block agreement.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator}); "
            f"choose a tensor_parallel_size that divides {numerator}"
        )
    return numerator // denominator
