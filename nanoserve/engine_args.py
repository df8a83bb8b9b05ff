"""Engine options as command-line flags, shared by every subcommand that builds an engine."""

from __future__ import annotations

import argparse
from typing import Any


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="local Hugging Face checkpoint directory (default: the built-in demo model, random weights)")
    g = parser.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="number of ranks to split the model over")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, half on CUDA) | float32 | bfloat16 | float16")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--kv-cache-dtype", default="auto", metavar="auto|float16",
                   help="what the KV cache stores: auto = the model's dtype; float16 = half the bytes of a float32 "
                        "model's cache on CPU (twice the tokens per budget, less to read per decode step; values "
                        "rounded once when stored, so greedy output may differ from float32; magnitudes above 65504 "
                        "overflow)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest sequence (prompt + output); default: the model's")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step (default 2048)")
    g.add_argument("--no-chunked-prefill", action="store_true", help="run each prompt in one step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget per rank, bytes or e.g. '2GiB' (default: a share of available host memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: fraction of device memory to use")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="default sampling settings (temperature, top_p, top_k, min_p, repetition_penalty, "
                        "max_new_tokens) for requests that leave them unset: auto = the model's "
                        "generation_config.json, vllm = ignore it (built-in defaults), or a FOLDER holding a "
                        "generation_config.json (default: auto)")  # fmt: skip
    q = parser.add_argument_group("low-bit weights")
    q.add_argument("--quantization", "-q", default=None, metavar="int8|int4|gptq|awq|compressed-tensors",
                   help="int8 (per-channel) or int4 (group-wise): quantize a float checkpoint as it loads; a "
                        "checkpoint with a quantization_config is detected and loaded as it is (gptq, awq, "
                        "compressed-tensors; naming it is optional, contradicting it an error)")
    q.add_argument("--quantization-group-size", type=int, default=None,
                   help="int4 group size along the input: 32, 64 or 128 (default 128, or the largest of 64, 32 that fits the model)")
    q.add_argument("--quantization-zero-point", action="store_true", help="int4 with zero points (asymmetric)")
    q.add_argument("--quantization-activations", default=None, choices=("fp32", "int8"),
                   help="fp32: exact arithmetic on the weights' values; int8: round activations per token to "
                        "int8 and use integer dot products (faster, approximate). Default: what the checkpoint "
                        "prescribes (int8 for a compressed-tensors W8A8 checkpoint), else fp32")
    q.add_argument("--quantization-skip", default=None, metavar="PATTERNS",
                   help="comma-separated module names or globs left in float, e.g. 'lm_head,*.down_proj' (the "
                        "LM head is int8 by default)")  # fmt: skip


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        tokenizer=args.tokenizer,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        device=args.device,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_chunked_prefill=not args.no_chunked_prefill,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        generation_config=args.generation_config,
        quantization=args.quantization,
        quantization_group_size=args.quantization_group_size,
        quantization_zero_point=args.quantization_zero_point,
        quantization_activations=args.quantization_activations,
        quantization_skip=args.quantization_skip,
    )


def resolve_model(model: str | None) -> str:
    if model is None:
        from nanoserve.tools.demo import demo_model_path

        return demo_model_path()
    return model
