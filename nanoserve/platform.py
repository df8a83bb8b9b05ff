"""Device choice lives here and only here: which device, which collective backend, how much memory."""

from __future__ import annotations

import os

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
