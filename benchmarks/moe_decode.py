"""Batch-1 decode of a mixture-of-experts model against a dense model with the same active parameters.

    python benchmarks/moe_decode.py [--cache-dir ~/.cache/nanoserve/bench] [--llama-cpp SRC --llama-cpp-convert-python PY]

Two random-weight checkpoints, built once into ``--cache-dir``:
  * ``qwen3-moe-1.5b``: Qwen3-30B-A3B's structure scaled to this machine in fp32: 24 layers, hidden 1024, 16
    heads of 128 (4 KV heads, q/k norms), every layer sparse with 16 experts 896 wide, top-2 renormalised,
    vocabulary 151,936, untied (as the 30B model is): about 1.5 B parameters, about 0.41 B of them active per
    token (attention, router, two experts per layer, the LM head; embeddings counted at one row per token);
  * ``qwen3-dense-a0.4b``: the same model with one dense MLP of 2 x 896 = 1,792 per layer instead of the
    experts, so each token multiplies the same number of weights.
Each runs ``nanoserve bench latency`` (batch 1, 128 prompt tokens, 128 output tokens, prefix cache off) in its
own process, one after the other; with ``--llama-cpp`` llama.cpp's f32 figure of the same two checkpoints
follows (``peer_llamacpp.py``). Printed: decode tokens/s, the MoE / dense ratio (the issue asks >= 0.7), the
weight bytes each decode step reads, and the bandwidth that implies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (sibling modules; benchmarks/ is not a package)
import peer_llamacpp  # noqa: E402

COMMON = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
              vocab_size=151936, max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6)  # fmt: skip
EXPERT_WIDTH, NUM_EXPERTS, TOP_K = 896, 16, 2
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-moe-1.5b": dict(arch="qwen3_moe", **COMMON, intermediate_size=EXPERT_WIDTH * TOP_K, num_experts=NUM_EXPERTS,
                           num_experts_per_tok=TOP_K, moe_intermediate_size=EXPERT_WIDTH, norm_topk_prob=True),
    "qwen3-dense-a0.4b": dict(arch="qwen3", **COMMON, intermediate_size=EXPERT_WIDTH * TOP_K),
}  # fmt: skip


def parameter_counts(shape: dict[str, Any]) -> dict[str, int]:
    """Total and per-token-active parameters (one embedding row per token; the whole LM head)."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    d, hq, hkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    attention = h * (hq + 2 * hkv) * d + hq * d * h + 2 * d  # q, k, v, o and the q/k norms
    norms = 2 * h
    if shape["arch"] == "qwen3_moe":
        expert = 3 * h * shape["moe_intermediate_size"]
        mlp_total = shape["num_experts"] * expert + shape["num_experts"] * h  # experts and the router
        mlp_active = shape["num_experts_per_tok"] * expert + shape["num_experts"] * h
    else:
        mlp_total = mlp_active = 3 * h * shape["intermediate_size"]
    total = layers * (attention + norms + mlp_total) + 2 * vocab * h + h
    active = layers * (attention + norms + mlp_active) + vocab * h + h + h
    return {"total": total, "active": active}


def run_nanoserve(model: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    out = args.cache_dir / f"{model.name}.latency.json"
    cmd = [sys.executable, "-m", "nanoserve.cli", "bench", "latency", str(model), "--input-len", "128",
           "--output-len", "128", "--num-iters", str(args.num_iters), "--no-prefix-caching",
           "--kv-cache-memory", "1GiB", "--output-json", str(out)]  # fmt: skip
    print(f"  nanoserve {model.name} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print("    failed:", " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:]))
        return None
    return json.loads(out.read_text())


def run_llama_cpp(model: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        peer_llamacpp.ensure_built(args.llama_cpp)
        files = peer_llamacpp.convert(args.llama_cpp, model, ["f32"], args.llama_cpp_convert_python)
        return peer_llamacpp.bench(args.llama_cpp, files["f32"], threads=2, reps=args.llama_cpp_reps)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"    llama.cpp failed: {exc}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.path.expanduser("~/.cache/nanoserve/bench")))
    parser.add_argument("--num-iters", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree (see peer_llamacpp.py)")
    parser.add_argument("--llama-cpp-convert-python", default=sys.executable)
    parser.add_argument("--llama-cpp-reps", type=int, default=3)
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    compare.SHAPES.update(SHAPES)
    rows = {}
    for name, shape in SHAPES.items():
        model = compare.checkpoint_for(name, args.cache_dir)
        counts = parameter_counts(shape)
        result = run_nanoserve(model, args)
        peer = run_llama_cpp(model, args) if args.llama_cpp else None
        rows[name] = (counts, result, peer)
    print(f"\nbatch-1 decode, 128 prompt + 128 output tokens, fp32, prefix cache off, {os.cpu_count()} CPUs")
    print(f"{'model':20s} {'params':>8s} {'active':>8s} {'read/token':>11s} {'tok/s':>7s} {'GB/s':>6s} {'llama.cpp f32':>14s}")
    rates = {}
    for name, (counts, result, peer) in rows.items():
        rate = result["figures"]["decode_tokens_per_s"] if result else None
        rates[name] = rate
        read = counts["active"] * 4
        peer_rate = peer["figures"]["decode_tokens_per_s"] if peer else None
        print(f"{name:20s} {counts['total'] / 1e9:7.2f}B {counts['active'] / 1e9:7.2f}B {read / 1e9:9.2f}GB "
              f"{compare._fmt(rate, '7.1f')} {compare._fmt(rate * read / 1e9 if rate else None, '6.1f')} "
              f"{compare._fmt(peer_rate, '14.1f')}")  # fmt: skip
    moe, dense = rates["qwen3-moe-1.5b"], rates["qwen3-dense-a0.4b"]
    if moe and dense:
        print(f"MoE / dense decode: {moe / dense:.2f}x (target >= 0.7x)")
    print("BENCH_JSON " + json.dumps({n: {"counts": c, "nanoserve": r, "llama_cpp": p} for n, (c, r, p) in rows.items()}))


if __name__ == "__main__":
    main()
