"""transformers as a peer: static batches with ``generate`` on the same checkpoint and requests.

    python benchmarks/peer_transformers.py --model DIR --requests FILE --mode throughput|latency [--batch-size 32]

``FILE`` is JSON ``[{"prompt_token_ids": [...], "max_tokens": n}, ...]`` (written by compare.py). Throughput:
requests are taken in order, ``--batch-size`` at a time, left-padded, and each batch generates greedily for
the longest ``max_tokens`` in it (EOS ignored); a request's output is its first ``max_tokens`` tokens, and
only those are counted. Latency: each request alone, timed end to end. Prints one JSON object like
``nanoserve bench`` does. Does not import nanoserve, so it runs in any environment with transformers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peer_common import peak_rss_bytes


def load(model_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def generate_batch(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuation of ``new_tokens`` tokens for each prompt (left padding, EOS ignored)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    # eos_token_id=None: nothing stops early, so every row gets exactly new_tokens tokens (EOS included).
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=None, eos_token_id=None, pad_token_id=pad_id
    )
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [row[width:].tolist() for row in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--iters", type=int, default=2, help="latency: timed repetitions (after one warm-up)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = json.load(open(args.requests))
    t0 = time.perf_counter()
    model = load(args.model, getattr(torch, args.dtype))
    load_s = time.perf_counter() - t0
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    generate_batch(model, [[1, 2, 3, 4]], 2, pad_id)  # warm-up

    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in requests)
    if args.mode == "throughput":
        outputs: list[list[int]] = []
        start = time.perf_counter()
        for i in range(0, len(requests), args.batch_size):
            batch = requests[i : i + args.batch_size]
            new = max(r["max_tokens"] for r in batch)
            rows = generate_batch(model, [r["prompt_token_ids"] for r in batch], new, pad_id)
            outputs += [row[: r["max_tokens"]] for row, r in zip(rows, batch)]
        elapsed = time.perf_counter() - start
        n_out = sum(len(o) for o in outputs)
        figures = {
            "output_tokens_per_s": n_out / elapsed,
            "total_tokens_per_s": (prompt_tokens + n_out) / elapsed,
            "load_s": load_s,
        }
    else:
        times, outputs = [], []
        for r in requests:
            runs = []
            for it in range(1 + args.iters):
                start = time.perf_counter()
                (row,) = generate_batch(model, [r["prompt_token_ids"]], r["max_tokens"], pad_id)
                if it:
                    runs.append(time.perf_counter() - start)
            times.append(sorted(runs)[len(runs) // 2])
            outputs.append(row)
        elapsed = sum(times)
        n_out = sum(len(o) for o in outputs)
        figures = {"e2e_latency_s": elapsed / len(requests), "e2e_output_tokens_per_s": n_out / elapsed, "load_s": load_s}
    result = {
        "kind": args.mode, "engine": "transformers", "model": args.model, "elapsed_s": elapsed,
        "num_requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": n_out, "figures": figures,
        "memory": {"peak_rss_bytes": peak_rss_bytes()},
        "settings": {"batch_size": args.batch_size, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                     "output_token_ids": outputs},
    }  # fmt: skip
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
