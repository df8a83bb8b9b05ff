"""How many KV blocks this rank can hold: its budget (host share on CPU, profiled free memory on CUDA),
before any agreement with the other ranks. The runner/worker owns this; ``kv_agreement`` only agrees on the
result and checks it."""

from __future__ import annotations

import logging
import os

import torch

from nanoserve.config import EngineConfig
from nanoserve.engine.step import ScheduledChunk, StepInput
from nanoserve.platform import host_available_memory
from nanoserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BUDGET_SCALE_ENV = "NANOSERVE_KV_BUDGET_SCALE"
SHORT_KV_ENV = "NANOSERVE_TEST_SHORT_KV"
# Fraction of the host's available memory that the KV caches of all local ranks may take by default.
DEFAULT_HOST_KV_FRACTION = 0.3
# Explicit budgets are still capped so that all local ranks together leave the host some headroom.
MAX_HOST_KV_FRACTION = 0.9


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


def short_kv_layers(rank: int, world_size: int, num_layers: int) -> tuple[int, ...]:
    """Testing aid: ``NANOSERVE_TEST_SHORT_KV=1:0`` allocates layer 0 of rank 1 with one block fewer than the
    agreed count (several as ``1:0,0:3``), so tests can show the start-up check catching one short layer on
    one rank. Returns this rank's short layers; empty when unset."""
    raw = os.environ.get(SHORT_KV_ENV, "").strip()
    if not raw:
        return ()
    layers = []
    for item in raw.split(","):
        try:
            r, layer = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"{SHORT_KV_ENV}={raw!r}: expected RANK:LAYER pairs such as '1:0' or '1:0,0:3'") from None
        if not (0 <= r < world_size and 0 <= layer < num_layers):
            raise ValueError(
                f"{SHORT_KV_ENV}={raw!r}: {item} is outside {world_size} ranks x {num_layers} attention layers"
            )
        if r == rank:
            layers.append(layer)
    return tuple(layers)


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


def local_num_blocks(runner: ModelRunner, config: EngineConfig, rank: int, size: int, local_world_size: int) -> int:
    """This rank's own estimate of how many KV blocks it can hold (before any agreement)."""
    if config.device == "cuda":
        peak = profile_peak_memory(runner, config)
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = int(total * config.gpu_memory_utilization) - peak - used_by_others
        if config.kv_cache_memory is not None:
            budget = min(budget, config.kv_cache_memory)
        how = f"gpu_memory_utilization={config.gpu_memory_utilization}, profiled peak {peak} bytes"
    else:
        budget, how = cpu_kv_budget(config.kv_cache_memory, host_available_memory(), local_world_size)
    scale = budget_scale(rank, size)
    budget = int(max(0, budget) * scale)
    blocks = budget // runner.kv_bytes_per_block
    logger.debug("rank %d: KV budget %d bytes (%s, scale %.2f) -> %d blocks", rank, budget, how, scale, blocks)
    return blocks


def profile_peak_memory(runner: ModelRunner, config: EngineConfig) -> int:
    """CUDA: peak bytes of weights plus activations for the largest step, measured by running one.

    A throwaway cache just big enough for the profiling sequence is allocated, used and released, so what
    remains after the peak is what the real KV cache may take.
    """
    num_tokens = min(config.max_num_batched_tokens, config.max_model_len)
    num_blocks = -(-num_tokens // config.block_size) + 1
    runner.allocate_kv_cache(num_blocks)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    chunk = ScheduledChunk(
        seq_id=-1, start=0, token_ids=[0] * num_tokens, block_ids=list(range(1, num_blocks)), reset=True, sample=True
    )
    runner.execute(StepInput([chunk], []))
    runner.execute(StepInput([], [-1]))  # forget the profiling sequence
    torch.cuda.synchronize()
    kv_bytes = num_blocks * runner.kv_bytes_per_block
    peak = torch.cuda.max_memory_allocated() - kv_bytes
    runner.release_kv_cache()
    torch.cuda.empty_cache()
    return peak
