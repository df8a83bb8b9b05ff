"""The KV capacity agreement: one block count, the MIN over ranks, used by every rank and the scheduler.

Each rank estimates how many blocks *it* can hold. Ranks differ (other tenants on a GPU, different budgets,
``NANOSERVE_KV_BUDGET_SCALE`` in tests), and a block id is only valid if it exists on every rank, so the
ranks all-reduce the MIN over the gloo (CPU) group — even when the model runs on CUDA — and every rank
allocates exactly that many. The scheduler's block manager is built from the same number, and each rank
reports what every one of its layers really allocated, which every rank checks against the agreement before
serving.

The context length is agreed the same way: it derives from the agreed count alone. A ``max_model_len`` the
user gave must fit one sequence in the agreed blocks, or start-up fails; the model's default length is
lowered to what the agreed blocks hold, so every rank (and the scheduler) serves the same length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanoserve.distributed.parallel_state import TPGroup

logger = logging.getLogger(__name__)

SKEW_WARNING = 0.10


@dataclass(frozen=True)
class KVCacheInfo:
    num_blocks: int  # the agreed count; the block manager's size
    local_num_blocks: list[int]  # each rank's own estimate, by rank
    allocated_num_blocks: list[int]  # what each rank really allocated (its smallest layer), reported by that rank
    block_size: int
    bytes_per_block: list[int]  # per rank (KV heads may be split or replicated)
    # The context length the engine serves: the configured max_model_len, or less when it was the model's
    # default and the agreed blocks hold less. The scheduler and server must use this, not the config's.
    max_model_len: int = 0
    allocated_per_layer: list[list[int]] = field(default_factory=list)  # [rank][attention layer] -> blocks

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


def gather_int_lists(values: list[int], tp: TPGroup) -> list[list[int]]:
    """Every rank's list, by rank (over the gloo group); the lists may differ in length."""
    lengths = tp.gather_ints(len(values))
    width = max(1, *lengths)
    padded = torch.tensor([*values, *[-1] * (width - len(values))], dtype=torch.int64)
    rows = tp.all_gather(padded, dim=0, cpu=True).view(tp.size, width).tolist()
    return [row[:n] for row, n in zip(rows, lengths)]


def establish_kv_cache(
    local_num_blocks: int,
    bytes_per_block: int,
    block_size: int,
    max_model_len: int,
    allocate: Callable[[int], list[int]],
    tp: TPGroup,
    agree: Callable[[int, TPGroup], tuple[int, list[int]]] = agree_on_num_blocks,
    *,
    max_model_len_explicit: bool = True,
) -> KVCacheInfo:
    """Run on every rank: agree, check, allocate, report, check again.

    ``allocate(n)`` allocates ``n`` blocks in every attention layer and returns what each layer really got.
    With ``max_model_len_explicit`` false, a ``max_model_len`` the agreed blocks cannot hold is lowered to
    what they hold (``KVCacheInfo.max_model_len``) instead of refusing to start. ``agree`` is replaceable
    so a test double can skip the agreement and show the consistency check catching the disagreement."""
    min_blocks_needed = -(-max_model_len // block_size)
    agreed, local = agree(local_num_blocks, tp)
    short = min(range(len(local)), key=lambda r: local[r])  # the rank with the least room
    if tp.rank == 0 and len(local) > 1 and max(local) > 0 and (max(local) - min(local)) / max(local) > SKEW_WARNING:
        logger.warning(
            "KV capacity estimates differ by more than %d%% across ranks: %s (ranks %s have the least); "
            "all ranks will use %d blocks", int(SKEW_WARNING * 100), local,
            [r for r, n in enumerate(local) if n == min(local)], agreed,
        )  # fmt: skip
    served_len = max_model_len
    if agreed < min_blocks_needed:
        if max_model_len_explicit or agreed < 1:
            raise RuntimeError(
                f"KV cache too small: rank {short} can hold {local[short]} blocks of {block_size} tokens but one "
                f"sequence of max_model_len ({max_model_len}) needs {min_blocks_needed} blocks (short by "
                f"{min_blocks_needed - local[short]} blocks, {(min_blocks_needed - local[short]) * bytes_per_block} "
                "bytes); raise kv_cache_memory or lower max_model_len"
            )
        # ceil(n / block_size) <= agreed  <=>  n <= agreed * block_size: the longest sequence that fits. It
        # derives from the agreed count alone, so every rank computes the same length.
        served_len = agreed * block_size
        if tp.rank == 0:
            logger.warning(
                "max_model_len lowered from the default %d to %d: the KV cache holds %d blocks of %d tokens "
                "(agreed across ranks; rank %d has the least room). To serve longer contexts, raise "
                "kv_cache_memory (or gpu_memory_utilization on CUDA); to choose the length yourself, pass "
                "max_model_len explicitly (start-up then fails if it does not fit)",
                max_model_len, served_len, agreed, block_size, short,
            )  # fmt: skip
    per_layer = gather_int_lists(list(allocate(agreed)), tp)
    allocated = [min(row, default=0) for row in per_layer]
    per_block = gather_ints(bytes_per_block, tp)
    info = KVCacheInfo(agreed, local, allocated, block_size, per_block, served_len, per_layer)
    check_consistent(info)
    if tp.rank == 0:
        logger.info(
            "KV cache: %d blocks x %d tokens agreed; local estimates %s; allocated %s; max_model_len %d",
            agreed, block_size, local, allocated, served_len,
        )  # fmt: skip
    return info


def check_consistent(info: KVCacheInfo) -> None:
    """Every layer of every rank must hold exactly the count the scheduler will hand out ids from.

    A block id names the same slot in every layer of every rank; one layer with fewer blocks on one rank
    would turn ids beyond its size into out-of-range writes (or silent reuse) there alone."""
    per_layer = info.allocated_per_layer or [[n] for n in info.allocated_num_blocks]
    layer_counts = [len(row) for row in per_layer]
    if len(set(layer_counts)) > 1:
        raise RuntimeError(
            f"KV cache mismatch: ranks have {layer_counts} attention layers; every rank must hold a cache for "
            "every layer. Refusing to start."
        )
    bad = [(r, layer, n) for r, row in enumerate(per_layer) for layer, n in enumerate(row) if n != info.num_blocks]
    if bad:
        shown = "; ".join(f"rank {r} layer {layer} has {n}" for r, layer, n in bad[:8])
        more = f" (and {len(bad) - 8} more layers)" if len(bad) > 8 else ""
        raise RuntimeError(
            f"KV cache mismatch: ranks allocated {info.allocated_num_blocks} blocks (fewest in any layer) but the "
            f"block manager would use {info.num_blocks}; ranks {sorted({r for r, _, _ in bad})} disagree: "
            f"{shown}{more}. Block ids would be invalid on some ranks; refusing to start."
        )
