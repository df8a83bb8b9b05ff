"""The tensor-parallel group a layer belongs to, passed explicitly to every parallel layer.

Groups are process-group objects built from a store and used directly — not torch.distributed's default
group — so one process can hold several engines (two TP engines side by side in one test session) and
nothing global has to be set up or torn down.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Rank and size of this process in its tensor-parallel group; collectives are no-ops at size 1.

    ``group`` carries the model's tensors (gloo on CPU, NCCL on CUDA); ``cpu_group`` is always gloo and
    carries control data: the per-step message and the KV block agreement.
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    cpu_group: Any = None

    def all_reduce(self, x: torch.Tensor, op: Any = dist.ReduceOp.SUM, cpu: bool = False) -> torch.Tensor:
        """In place, and returned for chaining."""
        if self.size > 1:
            opts = dist.AllreduceOptions()
            opts.reduceOp = op
            (self.cpu_group if cpu else self.group).allreduce([x], opts).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1, cpu: bool = False) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        (self.cpu_group if cpu else self.group).allgather([parts], [x]).wait()
        return torch.cat(parts, dim=dim)

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value``, by rank (over the gloo group)."""
        if self.size == 1:
            return [value]
        return self.all_gather(torch.tensor([value], dtype=torch.int64), dim=0, cpu=True).tolist()

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Pickle ``obj`` on ``src`` and return it on every rank (two gloo broadcasts: length, then bytes)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        if self.rank == src:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self.cpu_group.broadcast([length], opts).wait()
        if self.rank != src:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self.cpu_group.broadcast([payload], opts).wait()
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())


def create_tp_group(store: Any, rank: int, size: int, device: str, timeout: datetime.timedelta) -> TPGroup:
    """Build the model group (NCCL on CUDA, gloo on CPU) and the gloo control group over one store."""
    cpu_group = dist.ProcessGroupGloo(dist.PrefixStore("nanoserve-cpu/", store), rank, size, timeout)
    if device == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(dist.PrefixStore("nanoserve-nccl/", store), rank, size, options)
    else:
        group = dist.ProcessGroupGloo(dist.PrefixStore("nanoserve-model/", store), rank, size, timeout)
    return TPGroup(rank=rank, size=size, group=group, cpu_group=cpu_group)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator}); "
            f"choose a tensor_parallel_size that divides {numerator}"
        )
    return numerator // denominator
