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
        free, total = torch.cuda.mem_get_info()
        # Weights are loaded; leave room for activations of the largest step (rough: 4 fp32 copies of the
        # hidden states and the logits of a full batch) and what other processes use.
        hf = config.hf_config
        activation = 4 * config.max_num_batched_tokens * (hf.hidden_size + hf.intermediate_size // tp.size) * 4
        used_by_others = total - free - torch.cuda.memory_allocated()
        budget = int(total * config.gpu_memory_utilization) - torch.cuda.memory_allocated() - used_by_others - activation
        if config.kv_cache_memory is not None:
            budget = min(budget, config.kv_cache_memory)
        how = f"gpu_memory_utilization={config.gpu_memory_utilization}"
    else:
        budget, how = cpu_kv_budget(config.kv_cache_memory, host_available_memory(), local_world_size)
    scale = budget_scale(tp.rank, tp.size)
    budget = int(max(0, budget) * scale)
    blocks = budget // runner.kv_bytes_per_block
    logger.debug("rank %d: KV budget %d bytes (%s, scale %.2f) -> %d blocks", tp.rank, budget, how, scale, blocks)
    return blocks


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
