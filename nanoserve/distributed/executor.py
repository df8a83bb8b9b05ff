"""Executors run steps on all ranks: in-process for one rank, worker processes for tensor parallelism."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from nanoserve.config import EngineConfig
from nanoserve.distributed.kv_agreement import (
    KVCacheInfo,
    budget_scale,
    cpu_kv_budget,
    establish_kv_cache,
)
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.engine.scheduler import ScheduledChunk
from nanoserve.platform import host_available_memory
from nanoserve.runner.model_runner import ModelRunner, StepInput

logger = logging.getLogger(__name__)


class Executor(Protocol):
    kv_info: KVCacheInfo

    def execute(self, step: StepInput) -> torch.Tensor | None: ...

    def shutdown(self) -> None: ...


def local_num_blocks(runner: ModelRunner, config: EngineConfig, tp: TPGroup, local_world_size: int) -> int:
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
    scale = budget_scale(tp.rank, tp.size)
    budget = int(max(0, budget) * scale)
    blocks = budget // runner.kv_bytes_per_block
    logger.debug("rank %d: KV budget %d bytes (%s, scale %.2f) -> %d blocks", tp.rank, budget, how, scale, blocks)
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


def start_rank(config: EngineConfig, tp: TPGroup, local_world_size: int, show_progress: bool = False) -> tuple[ModelRunner, KVCacheInfo]:
    """Build this rank's runner and take part in the KV agreement (every rank runs this, in lockstep)."""
    runner = ModelRunner(config, tp, show_progress=show_progress)
    info = establish_kv_cache(
        local_num_blocks(runner, config, tp, local_world_size),
        runner.kv_bytes_per_block,
        config.block_size,
        -(-config.max_model_len // config.block_size),
        runner.allocate_kv_cache,
        tp,
    )
    return runner, info


class LocalExecutor:
    """Tensor parallelism of one: the runner lives in this process."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner, self.kv_info = start_rank(config, TPGroup(), local_world_size=1, show_progress=True)

    def execute(self, step: StepInput) -> torch.Tensor | None:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        pass
