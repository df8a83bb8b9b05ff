"""Device choice lives here and only here: which device, which collective backend, how much memory."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: choose 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch sees no CUDA device; use device='cpu'")
    return device


def dist_backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def host_available_memory() -> int:
    """Bytes the host can still hand out (MemAvailable), capped by a cgroup limit when one is set."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            available = min(available, max(0, int(raw) - usage))
        break
    return available


def set_cpu_threads(num_threads: int | None) -> None:
    """Intra-op threads for this process; ranks on one host split the cores between them."""
    if num_threads is None:
        return
    torch.set_num_threads(max(1, num_threads))


def local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


ATTENTION_BACKEND_ENV = "NANOSERVE_ATTENTION_BACKEND"


def default_attention_backend(device: str) -> str:
    """``cpu_native`` on CPU (a C decode kernel, built on first use; it falls back to ``torch_sdpa`` by itself
    when no compiler is available or for dtypes other than float32), ``torch_sdpa`` elsewhere or when
    ``NANOSERVE_NATIVE=0``. ``NANOSERVE_ATTENTION_BACKEND`` overrides."""
    from nanoserve.layers import native

    override = os.environ.get(ATTENTION_BACKEND_ENV, "").strip()
    if override:
        return override
    return "cpu_native" if device == "cpu" and native.enabled() else "torch_sdpa"


PACK_WEIGHTS_ENV = "NANOSERVE_PACK_WEIGHTS"


def pack_cpu_weights(device: str, dtype: torch.dtype) -> bool:
    """Whether linear weights are reordered for oneDNN after loading (CPU, float32; ``NANOSERVE_PACK_WEIGHTS=0``
    keeps the dense weights and torch's default GEMM)."""
    if os.environ.get(PACK_WEIGHTS_ENV, "1") in ("0", "false", "off"):
        return False
    return device == "cpu" and dtype == torch.float32


HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGES_ENV = "NANOSERVE_HUGE_PAGES"
_MADV_HUGEPAGE = 14  # linux/mman.h


def host_zeros(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU buffer of ``nbytes`` whose whole 2 MiB stretches are backed by transparent huge pages
    where the kernel allows it (``madvise`` mode included). Batch-1 decode streams every weight once a step:
    with 4 KiB pages a step walks ~150,000 page-table entries for Qwen3-0.6B at int8 (measured on 2 Sapphire
    Rapids threads, all 113 int8 projections of Qwen3-0.6B back to back, two alternating rounds: 24.1 / 25.1
    -> 27.5 / 28.2 GB/s; ``bench latency`` decode 35.6 -> 38.5 tok/s).

    Only the aligned interior is advised, before anything touches it, so resident memory stays the buffer's
    size: the slack before it is never touched and its tail keeps small pages. Elsewhere (not Linux, THP
    ``never``, ``NANOSERVE_HUGE_PAGES=0``, small buffers) this is ``torch.zeros``."""
    if nbytes < HUGE_PAGE_BYTES or not _huge_pages_enabled():
        return torch.zeros(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + HUGE_PAGE_BYTES, dtype=torch.uint8)  # large: fresh, untouched mapped pages
    offset = -raw.data_ptr() % HUGE_PAGE_BYTES
    buf = raw[offset : offset + nbytes]
    advised = nbytes // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    _libc().madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(advised), _MADV_HUGEPAGE)  # best effort
    return buf.zero_()


def _huge_pages_enabled() -> bool:
    if os.environ.get(HUGE_PAGES_ENV, "1").lower() in ("0", "false", "off") or not sys.platform.startswith("linux"):
        return False
    return _libc() is not None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None
