"""Decode throughput at tensor_parallel_size 1 vs N on the same checkpoint and workload, in one run.

On a 2-core CPU host expect no speed-up: the ranks split the same two cores and add an all-reduce per layer.
The point is to measure the cost honestly, not to show a gain.

    .venv/bin/python benchmarks/tp_scaling.py [MODEL] --tp 2 --num-prompts 16 --prompt-len 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import time

from nanoserve import LLM, SamplingParams


def measure(model: str | None, tp: int, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(model, tensor_parallel_size=tp, kv_cache_memory="1GiB") as llm:
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        batch_s = time.perf_counter() - start
        start = time.perf_counter()
        single = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
        single_s = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "tp": tp,
        "batch_output_tok_per_s": tokens / batch_s,
        "batch1_decode_tok_per_s": len(single[0].outputs[0].token_ids) / single_s,
        "token_ids": [o.outputs[0].token_ids for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 1000) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    one = measure(args.model, 1, prompts, args.max_tokens)
    many = measure(args.model, args.tp, prompts, args.max_tokens)
    same = one.pop("token_ids") == many.pop("token_ids")
    print(json.dumps({"tp1": one, f"tp{args.tp}": many, "identical_greedy_tokens": same,
                      "batch_ratio": many["batch_output_tok_per_s"] / one["batch_output_tok_per_s"],
                      "batch1_ratio": many["batch1_decode_tok_per_s"] / one["batch1_decode_tok_per_s"]}, indent=2))


if __name__ == "__main__":
    main()
