"""The KV capacity agreement: one block count, the MIN over ranks, used by every rank and the scheduler.

Each rank estimates how many blocks *it* can hold. Ranks differ (other tenants on a GPU, different budgets,
``NANOSERVE_KV_BUDGET_SCALE`` in tests), and a block id is only valid if it exists on every rank, so the
ranks all-reduce the MIN over the gloo (CPU) group — even when the model runs on CUDA — and every rank
allocates exactly that many. The scheduler's block manager is built from the same number, and each rank
reports what it really allocated, which the driver checks against the agreement before serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoserve.distributed.parallel_state import TPGroup

logger = logging.getLogger(__name__)

BUDGET_SCALE_ENV = "NANOSERVE_KV_BUDGET_SCALE"
# Fraction of the host's available memory that the KV caches of all local ranks may take by default.
DEFAULT_HOST_KV_FRACTION = 0.3
# Explicit budgets are still capped so that all local ranks together leave the host some headroom.
MAX_HOST_KV_FRACTION = 0.9
SKEW_WARNING = 0.10


@dataclass(frozen=True)
class KVCacheInfo:
    num_blocks: int  # the agreed count; the block manager's size
    local_num_blocks: list[int]  # each rank's own estimate, by rank
    allocated_num_blocks: list[int]  # what each rank really allocated, reported by that rank
    block_size: int
    bytes_per_block: list[int]  # per rank (KV heads may be split or replicated)

    def as_dict(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "local_num_blocks": list(self.local_num_blocks),
            "allocated_num_blocks": list(self.allocated_num_blocks),
            "block_size": self.block_size,
            "bytes_per_block": list(self.bytes_per_block),
            "num_tokens": self.num_blocks * self.block_size,
        }


def budget_scale(rank: int, world_size: int) -> float:
    """Testing aid: ``NANOSERVE_KV_BUDGET_SCALE=1.0,0.4`` multiplies rank 0's budget by 1.0 and rank 1's by 0.4
    before the agreement, so tests can make ranks really disagree. A single value applies to every rank."""
    raw = os.environ.get(BUDGET_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factors = [float(x) for x in raw.split(",")]
    except ValueError:
        raise ValueError(f"{BUDGET_SCALE_ENV}={raw!r}: expected comma-separated numbers such as '1.0,0.4'") from None
    if len(factors) == 1:
        factors = factors * world_size
    if len(factors) != world_size or any(f <= 0 for f in factors):
        raise ValueError(f"{BUDGET_SCALE_ENV}={raw!r}: need {world_size} positive factors, one per rank")
    return factors[rank]


def cpu_kv_budget(requested: int | None, available: int, local_world_size: int) -> tuple[int, str]:
    """Bytes of KV cache one CPU rank may take. Ranks on one host share its RAM: the default is a share of
    the host's available memory divided among them, and an explicit per-rank budget is capped so the
    host's total stays within what it has. Returns (bytes, how it was decided)."""
    share = available // local_world_size
    if requested is None:
        return int(share * DEFAULT_HOST_KV_FRACTION), f"default {DEFAULT_HOST_KV_FRACTION:.0%} of available/{local_world_size}"
    cap = int(share * MAX_HOST_KV_FRACTION)
    if requested > cap:
        return cap, f"kv_cache_memory {requested} capped to {cap} by host memory"
    return requested, "kv_cache_memory"


def agree_on_num_blocks(local_num_blocks: int, tp: TPGroup) -> tuple[int, list[int]]:
    """(MIN over ranks, every rank's estimate by rank), over the gloo group."""
    agreed = tp.all_reduce(torch.tensor([local_num_blocks], dtype=torch.int64), op=dist.ReduceOp.MIN, cpu=True)
    return int(agreed.item()), tp.gather_ints(local_num_blocks)


def gather_ints(value: int, tp: TPGroup) -> list[int]:
    return tp.gather_ints(value)


def establish_kv_cache(
    local_num_blocks: int,
    bytes_per_block: int,
    block_size: int,
    min_blocks_needed: int,
    allocate: Callable[[int], int],
    tp: TPGroup,
    agree: Callable[[int, TPGroup], tuple[int, list[int]]] = agree_on_num_blocks,
) -> KVCacheInfo:
    """Run on every rank: agree, check, allocate, report. ``agree`` is replaceable so a test double can
    skip the agreement and show the consistency check catching the disagreement."""
    agreed, local = agree(local_num_blocks, tp)
    if tp.rank == 0 and len(local) > 1 and max(local) > 0 and (max(local) - min(local)) / max(local) > SKEW_WARNING:
        short = [r for r, n in enumerate(local) if n == min(local)]
        logger.warning(
            "KV capacity estimates differ by more than %d%% across ranks: %s (ranks %s have the least); "
            "all ranks will use %d blocks", int(SKEW_WARNING * 100), local, short, agreed,
        )  # fmt: skip
    if agreed < min_blocks_needed:
        short = min(range(len(local)), key=lambda r: local[r])
        raise RuntimeError(
            f"KV cache too small: rank {short} can hold {local[short]} blocks of {block_size} tokens but one "
            f"sequence of max_model_len needs {min_blocks_needed} blocks (short by "
            f"{min_blocks_needed - local[short]} blocks, {(min_blocks_needed - local[short]) * bytes_per_block} "
            "bytes); raise kv_cache_memory or lower max_model_len"
        )
    allocated = gather_ints(allocate(agreed), tp)
    per_block = gather_ints(bytes_per_block, tp)
    info = KVCacheInfo(agreed, local, allocated, block_size, per_block)
    check_consistent(info)
    if tp.rank == 0:
        logger.info(
            "KV cache: %d blocks x %d tokens agreed; local estimates %s; allocated %s",
            agreed, block_size, local, allocated,
        )  # fmt: skip
    return info


def check_consistent(info: KVCacheInfo) -> None:
    """Every rank must have allocated exactly the count the scheduler will hand out ids from."""
    bad = [r for r, n in enumerate(info.allocated_num_blocks) if n != info.num_blocks]
    if bad:
        raise RuntimeError(
            f"KV cache mismatch: ranks allocated {info.allocated_num_blocks} blocks but the block manager would "
            f"use {info.num_blocks}; ranks {bad} disagree. Block ids would be invalid on some ranks; refusing to start."
        )
