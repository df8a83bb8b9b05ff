"""Executors carry steps to every rank and bring rank 0's result back: in-process for one rank, worker
processes for tensor parallelism (``multiproc``). They transport; the runner computes and sizes memory."""

from __future__ import annotations

import logging
from typing import Protocol

from nanoserve.config import EngineConfig
from nanoserve.distributed.kv_agreement import KVCacheInfo
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.engine.step import RunnerOutput, StepInput
from nanoserve.runner.worker import start_rank

logger = logging.getLogger(__name__)


class Executor(Protocol):
    kv_info: KVCacheInfo

    def execute(self, step: StepInput) -> RunnerOutput: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """Tensor parallelism of one: the runner lives in this process."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner, self.kv_info = start_rank(config, TPGroup(), local_world_size=1, show_progress=True)

    def execute(self, step: StepInput) -> RunnerOutput:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        pass
