"""The KV capacity agreement: one block count, the MIN over ranks, used by every rank and the scheduler.

Each rank estimates how many blocks *it* can hold. Ranks differ (other tenants on a GPU, different budgets,
``NANOSERVE_KV_BUDGET_SCALE`` in tests), and a block id is only valid if it exists on every rank, so the
ranks all-reduce the MIN over the gloo (CPU) group — even when the model runs on CUDA — and every rank
allocates exactly that many. The scheduler's block manager is built from the same number, and each rank
reports what it really allocated, which the driver checks against the agreement before serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoserve.distributed.parallel_state import TPGroup

logger = logging.getLogger(__name__)

SKEW_WARNING = 0.10


@dataclass(frozen=True)
class KVCacheInfo:
    num_blocks: int  # the agreed count; the block manager's size
    local_num_blocks: list[int]  # each rank's own estimate, by rank
    allocated_num_blocks: list[int]  # what each rank really allocated, reported by that rank
    block_size: int
    bytes_per_block: list[int]  # per rank (KV heads may be split or replicated)
    max_model_len: int = 0  # the context length the engine serves (agreed with the block count)

    def as_dict(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "local_num_blocks": list(self.local_num_blocks),
            "allocated_num_blocks": list(self.allocated_num_blocks),
            "block_size": self.block_size,
            "bytes_per_block": list(self.bytes_per_block),
            "num_tokens": self.num_blocks * self.block_size,
            "max_model_len": self.max_model_len,
        }


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
    max_model_len: int,
    allocate: Callable[[int], int],
    tp: TPGroup,
    agree: Callable[[int, TPGroup], tuple[int, list[int]]] = agree_on_num_blocks,
) -> KVCacheInfo:
    """Run on every rank: agree, check, allocate, report. ``agree`` is replaceable so a test double can
    skip the agreement and show the consistency check catching the disagreement."""
    min_blocks_needed = -(-max_model_len // block_size)
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
    info = KVCacheInfo(agreed, local, allocated, block_size, per_block, max_model_len)
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
