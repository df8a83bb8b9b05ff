"""`nanoserve bench throughput | latency | prefill [MODEL]`: timed runs of the engine on synthetic workloads.

* ``throughput``: workload A by default — N requests whose prompt lengths, output lengths and token ids are
  drawn uniformly from the given ranges with a seeded ``random.Random`` (greedy, EOS ignored), all submitted
  at once; figures are output tokens/s and total tokens/s over the ``generate`` call.
* ``latency``: a batch of identical-shape requests (default one: 128 in / 128 out), timed step by step, so
  the time to first token and the decode rate are reported separately.
* ``prefill``: a large batch of prompts with one output token each; reports achieved FLOP/s.

Every subcommand prints a JSON object (``--output-json PATH`` also writes it to a file) with the figures,
the peak RSS of the process and the weight / KV cache sizes, so ``benchmarks/compare.py`` can read it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model

# ---------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    """Uniform random requests. Defaults are workload A (5,042 prompt + 2,556 output tokens)."""

    num_prompts: int = 32
    input_len: tuple[int, int] = (64, 256)  # inclusive range
    output_len: tuple[int, int] = (32, 128)  # inclusive range
    token_id_high: int = 10000  # token ids are uniform in [0, token_id_high)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}: need 1 <= min <= max, got ({lo}, {hi})")
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        if self.token_id_high < 1:
            raise ValueError(f"token_id_high: must be >= 1, got {self.token_id_high}")


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(spec: WorkloadSpec) -> list[BenchRequest]:
    """The requests of ``spec``. The draw order (prompt length, its tokens, then output length, request by
    request) is part of the definition: ``random.seed(0)`` with module-level draws in that order gives the
    same requests, so other engines' scripts can reproduce workload A without importing nanoserve."""
    rng = random.Random(spec.seed)
    requests = []
    for _ in range(spec.num_prompts):
        n_in = rng.randint(*spec.input_len)
        tokens = [rng.randint(0, spec.token_id_high - 1) for _ in range(n_in)]
        n_out = rng.randint(*spec.output_len)
        requests.append(BenchRequest(tokens, n_out))
    return requests


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass
class MemoryReport:
    peak_rss_bytes: int
    baseline_rss_bytes: int  # RSS after imports, before the model was built
    weight_bytes: int
    kv_budget_bytes: int  # allocated KV cache (address space; pages become resident as blocks are written)
    kv_used_peak_bytes: int  # the most KV bytes held by live blocks at any step

    @property
    def overhead_ratio(self) -> float:
        """peak RSS / (weights + KV budget): the target's ceiling is 1.25."""
        return self.peak_rss_bytes / max(1, self.weight_bytes + self.kv_budget_bytes)


@dataclass
class BenchResult:
    kind: str
    engine: str
    model: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    figures: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM, which starts afresh at exec (``ru_maxrss`` does not: a
    benchmark started by a big parent process would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------


class _KVTracker:
    """Follows the most KV blocks in use over a run, from the engine's block manager after each step."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.peak_used_blocks = 0

    def observe(self) -> None:
        bm = self.engine.block_manager
        self.peak_used_blocks = max(self.peak_used_blocks, bm.num_blocks - bm.num_free_blocks)


def _build_llm(args: argparse.Namespace) -> tuple[Any, int]:
    from nanoserve import LLM

    baseline = current_rss_bytes()
    llm = LLM(resolve_model(args.model), **engine_kwargs(args))
    return llm, baseline


def _memory(llm: Any, baseline: int, tracker: _KVTracker) -> dict[str, Any]:
    runner = getattr(llm.engine.executor, "runner", None)
    weight_bytes = runner.weight_bytes() if runner is not None else 0
    bytes_per_block = llm.engine.executor.kv_info.bytes_per_block[0]
    num_blocks = llm.engine.block_manager.num_blocks
    report = MemoryReport(
        peak_rss_bytes=peak_rss_bytes(),
        baseline_rss_bytes=baseline,
        weight_bytes=weight_bytes,
        kv_budget_bytes=num_blocks * bytes_per_block,
        kv_used_peak_bytes=tracker.peak_used_blocks * bytes_per_block,
    )
    return {**asdict(report), "overhead_ratio": round(report.overhead_ratio, 3)}


def _run_to_completion(llm: Any, requests: list[BenchRequest], tracker: _KVTracker) -> tuple[list[Any], list[float]]:
    """Submit every request, step until done. Returns the finished outputs (input order) and step end times."""
    from nanoserve import SamplingParams

    engine = llm.engine
    ids = [f"bench-{i}" for i in range(len(requests))]
    for rid, req in zip(ids, requests):
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=req.max_tokens)
        engine.add_request(rid, {"prompt_token_ids": req.prompt_token_ids}, params)
    done: dict[str, Any] = {}
    step_times: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step_times.append(time.perf_counter())
        tracker.observe()
    return [done[rid] for rid in ids], step_times


def _warm_up(llm: Any, tracker: _KVTracker) -> None:
    # First calls allocate buffers and pick kernels; keep them out of the timed region.
    _run_to_completion(llm, [BenchRequest(list(range(1, 33)), 4), BenchRequest(list(range(2, 20)), 4)], tracker)


def run_throughput(args: argparse.Namespace) -> BenchResult:
    spec = WorkloadSpec(
        num_prompts=args.num_prompts,
        input_len=(args.input_len_min, args.input_len_max),
        output_len=(args.output_len_min, args.output_len_max),
        token_id_high=args.token_id_high,
        seed=args.workload_seed,
    )
    requests = make_workload(spec)
    t0 = time.perf_counter()
    llm, baseline = _build_llm(args)
    load_s = time.perf_counter() - t0
    tracker = _KVTracker(llm.engine)
    _warm_up(llm, tracker)
    start = time.perf_counter()
    outputs, _ = _run_to_completion(llm, requests, tracker)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    n_in = sum(len(r.prompt_token_ids) for r in requests)
    result = BenchResult(
        kind="throughput", engine="nanoserve", model=str(llm.config.model), elapsed_s=elapsed,
        num_requests=len(requests), prompt_tokens=n_in, output_tokens=n_out,
        figures={
            "output_tokens_per_s": n_out / elapsed,
            "total_tokens_per_s": (n_in + n_out) / elapsed,
            "requests_per_s": len(requests) / elapsed,
            "load_s": load_s,
        },
        memory=_memory(llm, baseline, tracker),
        settings={**asdict(spec), **_engine_settings(llm)},
    )  # fmt: skip
    if args.save_tokens:
        result.settings["output_token_ids"] = [list(o.outputs[0].token_ids) for o in outputs]
    llm.close()
    return result


def run_latency(args: argparse.Namespace) -> BenchResult:
    rng = random.Random(args.workload_seed)
    t0 = time.perf_counter()
    llm, baseline = _build_llm(args)
    load_s = time.perf_counter() - t0
    tracker = _KVTracker(llm.engine)
    _warm_up(llm, tracker)
    ttfts, decode_rates, e2e = [], [], []
    for it in range(args.num_iters_warmup + args.num_iters):
        requests = [
            BenchRequest([rng.randint(0, args.token_id_high - 1) for _ in range(args.input_len)], args.output_len)
            for _ in range(args.batch_size)
        ]
        start = time.perf_counter()
        _, step_times = _run_to_completion(llm, requests, tracker)
        if it < args.num_iters_warmup:
            continue
        # With batch <= the token budget the first step is the whole prefill and samples token 1.
        first = step_times[0] - start
        total = step_times[-1] - start
        ttfts.append(first)
        e2e.append(total)
        decode_rates.append((args.output_len - 1) / (total - first) if args.output_len > 1 else 0.0)
    median = _median
    total_out = args.batch_size * args.output_len
    result = BenchResult(
        kind="latency", engine="nanoserve", model=str(llm.config.model), elapsed_s=median(e2e),
        num_requests=args.batch_size, prompt_tokens=args.batch_size * args.input_len, output_tokens=total_out,
        figures={
            "e2e_latency_s": median(e2e),
            "ttft_s": median(ttfts),
            # per sequence: tokens/s one user sees during decode; e2e counts prefill too
            "decode_tokens_per_s": median(decode_rates),
            "e2e_output_tokens_per_s": total_out / median(e2e),
            "load_s": load_s,
        },
        memory=_memory(llm, baseline, tracker),
        settings={
            "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
            "num_iters": args.num_iters, **_engine_settings(llm),
        },
    )  # fmt: skip
    llm.close()
    return result


def forward_flops(hf_config: Any, prompt_lens: list[int], sampled_rows: int) -> float:
    """FLOPs of the useful work of one prefill: 2 per weight per token in the decoder layers, causal
    attention (QK^T and PV over the lower triangle only) and the LM head for the sampled rows."""
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = hf_config.num_key_value_heads
    d = getattr(hf_config, "head_dim", None) or h // heads
    inter = hf_config.intermediate_size
    per_layer_weights = h * (heads + 2 * kv_heads) * d + heads * d * h + 3 * h * inter
    tokens = sum(prompt_lens)
    layers = hf_config.num_hidden_layers
    linear = 2 * per_layer_weights * tokens * layers
    attention = sum(4 * heads * d * n * (n + 1) / 2 for n in prompt_lens) * layers
    head = 2 * h * hf_config.vocab_size * sampled_rows
    return float(linear + attention + head)


def run_prefill(args: argparse.Namespace) -> BenchResult:
    rng = random.Random(args.workload_seed)
    t0 = time.perf_counter()
    llm, baseline = _build_llm(args)
    load_s = time.perf_counter() - t0
    tracker = _KVTracker(llm.engine)
    _warm_up(llm, tracker)
    times = []
    for it in range(args.num_iters_warmup + args.num_iters):
        requests = [
            BenchRequest([rng.randint(0, args.token_id_high - 1) for _ in range(args.input_len)], 1)
            for _ in range(args.batch_size)
        ]
        start = time.perf_counter()
        _run_to_completion(llm, requests, tracker)
        if it >= args.num_iters_warmup:
            times.append(time.perf_counter() - start)
    elapsed = _median(times)
    flops = forward_flops(llm.config.hf_config, [args.input_len] * args.batch_size, args.batch_size)
    n_in = args.batch_size * args.input_len
    result = BenchResult(
        kind="prefill", engine="nanoserve", model=str(llm.config.model), elapsed_s=elapsed,
        num_requests=args.batch_size, prompt_tokens=n_in, output_tokens=args.batch_size,
        figures={"prompt_tokens_per_s": n_in / elapsed, "gflops_per_s": flops / elapsed / 1e9, "load_s": load_s},
        memory=_memory(llm, baseline, tracker),
        settings={"batch_size": args.batch_size, "input_len": args.input_len, "flops": flops, **_engine_settings(llm)},
    )  # fmt: skip
    llm.close()
    return result


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _engine_settings(llm: Any) -> dict[str, Any]:
    import torch

    c = llm.config
    return {
        "dtype": str(c.dtype).replace("torch.", ""),
        "kv_cache_dtype": str(c.kv_cache_dtype).replace("torch.", ""),
        "block_size": c.block_size,
        "max_num_batched_tokens": c.max_num_batched_tokens,
        "max_num_seqs": c.max_num_seqs,
        "tensor_parallel_size": c.tensor_parallel_size,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark throughput, latency or prefill FLOP/s on synthetic requests")
    kinds = p.add_subparsers(dest="bench_kind", required=True)

    t = kinds.add_parser("throughput", help="offline throughput on uniform random requests (default: workload A)")
    add_engine_args(t)
    t.add_argument("--num-prompts", type=int, default=32)
    t.add_argument("--input-len-min", type=int, default=64)
    t.add_argument("--input-len-max", type=int, default=256)
    t.add_argument("--output-len-min", type=int, default=32)
    t.add_argument("--output-len-max", type=int, default=128)
    t.add_argument("--save-tokens", action="store_true", help="include every request's output token ids in the JSON")
    t.set_defaults(run=_main(run_throughput))

    lat = kinds.add_parser("latency", help="time to first token and decode rate of a fixed batch (default: 1)")
    add_engine_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.set_defaults(run=_main(run_latency))

    pre = kinds.add_parser("prefill", help="FLOP/s of large prefill batches (one output token each)")
    add_engine_args(pre)
    pre.add_argument("--batch-size", type=int, default=8)
    pre.add_argument("--input-len", type=int, default=256)
    pre.add_argument("--num-iters", type=int, default=3)
    pre.add_argument("--num-iters-warmup", type=int, default=1)
    pre.set_defaults(run=_main(run_prefill))

    for sub in (t, lat, pre):
        sub.add_argument("--token-id-high", type=int, default=10000, help="prompt token ids are uniform in [0, this)")
        sub.add_argument("--workload-seed", type=int, default=0, help="seed of the request generator")
        sub.add_argument("--output-json", default=None, help="also write the result JSON to this file")


def _main(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        result = fn(args)
        text = result.to_json()
        if args.output_json:
            with open(args.output_json, "w") as f:
                f.write(text + "\n")
        sys.stdout.write(text + "\n")
        return 0

    return run
