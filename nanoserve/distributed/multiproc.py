"""Tensor parallelism over processes: rank 0 (this process) drives, ranks 1..N-1 are workers.

Start-up, on every rank in lockstep: join the process group (a TCP store on a free port chosen now, or the
torchrun environment), build this rank's shard of the model, take part in the KV capacity agreement.

Each step the driver broadcasts one :class:`StepInput` over the gloo group; every rank runs the same forward
(the collectives inside the layers keep them in step) and only rank 0 keeps the logits. A pickled StepInput
is about 45 bytes per decoding sequence (1.4 KB for a 32-sequence decode step) and 3-5 bytes per prefill
token (6.6 KB for a 2048-token chunk): the chunk's tokens and the block ids added since the last step, never
whole sequences.

Failure: a worker that raises sends its traceback down a pipe and exits; one that is killed simply
disappears. Either way gloo fails the driver's pending collective within moments ("connection closed by
peer"), and the driver raises :class:`WorkerFailure` naming the rank. Workers die with their parent
(PR_SET_PDEATHSIG) and on any collective error.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import gc
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup, create_tp_group
from nanoserve.engine.step import RunnerOutput, StepInput
from nanoserve.platform import local_cpu_count
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.runner.worker import start_rank

logger = logging.getLogger(__name__)

# tqdm's default write lock is a multiprocessing semaphore that is never unlinked; once we have spawned
# workers, the resource tracker warns about it at exit. Only this process draws bars: a thread lock suffices.
tqdm.set_lock(threading.RLock())

_STORE_TIMEOUT = datetime.timedelta(seconds=120)
# Collectives normally fail fast when a peer dies (the socket closes); this bounds the rare silent hang.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
_SHUTDOWN = "shutdown"


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot continue."""


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: rely on collective errors instead
        pass


def _init_group(config: EngineConfig, rank: int, world_size: int, store: Any) -> TPGroup:
    return create_tp_group(store, rank, world_size, config.device, _COLLECTIVE_TIMEOUT)


def _env_store(rank: int, world_size: int) -> Any:
    """torchrun mode: the store at MASTER_ADDR:MASTER_PORT.

    Under the torch elastic launcher (``torchrun``) its agent already hosts that store and says so with
    ``TORCHELASTIC_USE_AGENT_STORE=True`` (tested exactly as torch.distributed.rendezvous does): every rank
    connects as a client, since hosting a second server on the same port fails to bind. Keys go under the
    launcher's restart count, so a restarted job never reads a previous attempt's keys from the long-lived
    agent store. Started by hand with the variables alone, rank 0 hosts the store and the others connect.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=_STORE_TIMEOUT)
        return dist.PrefixStore(f"nanoserve-attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    return dist.TCPStore(
        addr, port, world_size, is_master=rank == 0, timeout=_STORE_TIMEOUT, wait_for_workers=False,
    )  # fmt: skip


def _set_device_and_threads(config: EngineConfig, local_rank: int, local_world_size: int) -> None:
    if config.device == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        # Ranks on one host share its cores; oversubscribing threads makes every collective wait on the slowest.
        torch.set_num_threads(max(1, local_cpu_count() // local_world_size))


def worker_loop(runner: ModelRunner, tp: TPGroup) -> None:
    """Run steps as the driver broadcasts them, until it says shutdown."""
    while True:
        step = tp.broadcast_object(src=0)
        if step == _SHUTDOWN:
            return
        runner.execute(step)


def _worker_main(config: EngineConfig, rank: int, world_size: int, store_port: int, errors: Connection) -> None:
    _die_with_parent()
    try:
        _set_device_and_threads(config, rank, world_size)
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=_STORE_TIMEOUT)
        tp = _init_group(config, rank, world_size, store)
        runner, _ = start_rank(config, tp, local_world_size=world_size)
        worker_loop(runner, tp)
    except BaseException:
        try:
            errors.send(traceback.format_exc())
        finally:
            os._exit(1)  # closing our sockets is what unblocks the driver's pending collective
    os._exit(0)


def run_env_worker(config: EngineConfig) -> None:
    """torchrun mode, ranks > 0: serve steps for the driver (rank 0), then exit the process."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    _set_device_and_threads(config, local_rank, local_world)
    tp = _init_group(config, rank, world_size, _env_store(rank, world_size))
    runner, _ = start_rank(config, tp, local_world_size=local_world)
    worker_loop(runner, tp)
    # Leave without interpreter teardown: destroying the process groups while gloo's threads still run can
    # abort the process ("terminate called without an active exception"), which the launcher reports as a
    # failed rank. The spawned workers exit the same way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class MultiprocExecutor:
    """Drives ``tensor_parallel_size`` ranks: spawns local workers, or joins a torchrun job as rank 0."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        world_size = config.tensor_parallel_size
        self._procs: list[mp.process.BaseProcess] = []
        self._error_pipes: list[Connection] = []
        self._failed: str | None = None
        self._closed = False
        if config.distributed_init == "env":
            env_world = int(os.environ["WORLD_SIZE"])
            if env_world != world_size:
                raise ValueError(f"WORLD_SIZE={env_world} but tensor_parallel_size={world_size}; they must match")
            if int(os.environ["RANK"]) != 0:
                run_env_worker(config)  # never returns
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            _set_device_and_threads(config, int(os.environ.get("LOCAL_RANK", 0)), local_world)
            self._store = _env_store(0, world_size)
            self.tp = _init_group(config, 0, world_size, self._store)
        else:
            local_world = world_size
            # Port 0: the OS picks a free port, so several engines can start side by side.
            store = dist.TCPStore(
                "127.0.0.1", 0, world_size, is_master=True, timeout=_STORE_TIMEOUT, wait_for_workers=False
            )
            ctx = mp.get_context("spawn")
            for rank in range(1, world_size):
                receiver, sender = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_worker_main, args=(config, rank, world_size, store.port, sender),
                    name=f"nanoserve-tp{rank}-{os.getpid()}", daemon=True,
                )  # fmt: skip
                proc.start()
                sender.close()
                self._procs.append(proc)
                self._error_pipes.append(receiver)
            _set_device_and_threads(config, 0, world_size)
            try:
                self.tp = self._guard(lambda: _init_group(config, 0, world_size, store))
            except BaseException:
                self._kill_workers()
                raise
            self._store = store
        atexit.register(_shutdown_ref, weakref.ref(self))
        try:
            self.runner, self.kv_info = self._guard(lambda: start_rank(config, self.tp, local_world, show_progress=True))
        except BaseException:
            self.shutdown()
            raise

    # ---- steps -----------------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> RunnerOutput:
        if self._failed:
            raise WorkerFailure(self._failed)

        def run() -> RunnerOutput:
            self.tp.broadcast_object(step, src=0)
            return self.runner.execute(step)

        return self._guard(run)

    def _guard(self, fn: Any) -> Any:
        """Run a collective; if it fails because a worker is gone, raise WorkerFailure naming it."""
        try:
            return fn()
        except Exception as exc:
            reason = self._worker_problem(wait=2.0)
            if reason is None:
                raise
            self._failed = reason
            self._kill_workers()
            raise WorkerFailure(reason) from exc

    def _worker_problem(self, wait: float = 0.0) -> str | None:
        """A description of the first failed worker, or None if all look healthy. With ``wait`` (after a
        collective failed), give a dying worker that long to deliver its traceback or exit."""
        deadline = time.monotonic() + wait
        while True:
            for rank, (proc, pipe) in enumerate(zip(self._procs, self._error_pipes), start=1):
                if pipe.poll(0):
                    try:
                        return f"tensor-parallel worker rank {rank} raised:\n{pipe.recv()}"
                    except EOFError:  # closed without a message: killed, or exiting
                        pass
                if not proc.is_alive():
                    proc.join(timeout=1)
                    return f"tensor-parallel worker rank {rank} died (exit code {proc.exitcode})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def check_health(self) -> str | None:
        """None when every worker is alive; otherwise why not (used by the server's /health)."""
        if self._failed:
            return self._failed
        return self._worker_problem()

    # ---- shutdown --------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._failed and getattr(self, "tp", None) is not None:
            try:
                if self._worker_problem() is None:
                    self.tp.broadcast_object(_SHUTDOWN, src=0)
            except Exception:  # a worker already gone: nothing to tell it
                pass
        for proc in self._procs:
            proc.join(timeout=10)
        self._kill_workers()
        # Destroy the process groups now, while the interpreter is whole: left to interpreter teardown, gloo's
        # threads may still be running when their owners are freed, which aborts the process ("terminate
        # called without an active exception"); under torchrun the launcher reports that as a failed rank.
        self.runner = self.tp = self._store = None
        gc.collect()

    def _kill_workers(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def _shutdown_ref(ref: weakref.ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()
