"""This machine's ceilings, measured with torch: fp32 GEMM FLOP/s and memory read bandwidth.

    python benchmarks/roofline.py [--threads N] [--json]

* GEMM: ``torch.mm`` of fp32 matrices, a large square one (the peak the prefill target is measured
  against) and the shapes of the benchmark models' projections at prefill-sized M.
* Bandwidth: best of several passes that read a 1 GiB buffer (``sum``), a matrix-vector product over a
  512 MiB matrix (what batch-1 decode does to every weight) and a copy (read + write counted). Every buffer
  is far larger than the last-level cache, so these are DRAM figures.

The batch-1 decode roofline of a model is ``bandwidth / bytes of weights read per token``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Roofline:
    threads: int
    gemm_gflops: float  # best large square fp32 GEMM
    gemm_shapes_gflops: dict[str, float]  # M x K x N -> GFLOP/s
    read_gbps: float  # best DRAM read bandwidth, GB/s (1e9)
    bandwidth_detail_gbps: dict[str, float]


def _best_time(fn: Callable[[], object], repeat: int, min_time: float = 0.3) -> float:
    """Fastest of ``repeat`` timings, each averaging enough calls to last ``min_time`` seconds."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    calls = max(1, int(min_time / one))
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def gemm_gflops(m: int, k: int, n: int, repeat: int = 5) -> float:
    a = torch.randn(m, k)
    b = torch.randn(k, n)
    out = torch.empty(m, n)
    dt = _best_time(lambda: torch.mm(a, b, out=out), repeat)
    return 2 * m * k * n / dt / 1e9


def read_bandwidth(repeat: int = 5) -> dict[str, float]:
    gib = 1 << 30
    x = torch.ones(gib // 4)
    detail = {"sum_1GiB": x.numel() * 4 / _best_time(lambda: x.sum(), repeat) / 1e9}
    w = x[: (512 << 20) // 4].view(-1, 4096)  # [32768, 4096] fp32 = 512 MiB
    v = torch.ones(4096)
    detail["gemv_512MiB"] = w.numel() * 4 / _best_time(lambda: torch.mv(w, v), repeat) / 1e9
    src = x[: (256 << 20) // 4]
    dst = torch.empty_like(src)
    detail["copy_256MiB(r+w)"] = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), repeat) / 1e9
    return detail


MODEL_SHAPES = {
    # name: (K, N) of each projection; M is the token count of a prefill step
    "smollm2-135m gate_up": (576, 3072),
    "smollm2-135m down": (1536, 576),
    "qwen3-0.6b gate_up": (1024, 6144),
    "qwen3-0.6b down": (3072, 1024),
}


def measure(threads: int | None = None, repeat: int = 5, m: int = 2048) -> Roofline:
    if threads is not None:
        torch.set_num_threads(threads)
    square = max(gemm_gflops(s, s, s, repeat) for s in (1024, 2048))
    shapes = {f"{name} M={m}": gemm_gflops(m, k, n, repeat) for name, (k, n) in MODEL_SHAPES.items()}
    bw = read_bandwidth(repeat)
    reads = [v for k, v in bw.items() if not k.startswith("copy")]
    return Roofline(torch.get_num_threads(), square, shapes, max(reads), bw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    r = measure(args.threads, args.repeat)
    if args.json:
        print(json.dumps(asdict(r), indent=2))
        return
    print(f"threads: {r.threads}")
    print(f"fp32 GEMM (square, best of 1024/2048): {r.gemm_gflops:7.1f} GFLOP/s")
    for name, v in r.gemm_shapes_gflops.items():
        print(f"  {name:32s} {v:7.1f} GFLOP/s")
    print(f"DRAM read bandwidth (best):            {r.read_gbps:7.1f} GB/s")
    for name, v in r.bandwidth_detail_gbps.items():
        print(f"  {name:32s} {v:7.1f} GB/s")


if __name__ == "__main__":
    main()
