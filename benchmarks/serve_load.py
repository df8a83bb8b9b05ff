"""A short load run against a running OpenAI-compatible server (nanoserve, or vLLM for comparison).

Sends ``--num-requests`` streaming completions, at most ``--concurrency`` at a time, and prints output tokens/s
and time-to-first-token percentiles. Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``), so
runs are comparable across servers and models.

    nanoserve serve --port 8000 &                  # the built-in demo model
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --num-requests 64 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass

import httpx
import openai

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches under "
         "bright autumn skies near old harbour towns where fishermen mend nets and children chase gulls").split()  # fmt: skip


@dataclass
class Result:
    ttft: float  # seconds from sending to the first generated text
    latency: float  # seconds from sending to the last chunk
    output_tokens: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Result:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Result(ttft=(first or end) - start, latency=end - start, output_tokens=tokens)


async def run(args: argparse.Namespace) -> tuple[str, list[Result], float]:
    """(model name, one result per request, wall seconds of the measured run)."""
    async with openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "none",
                                  max_retries=0, timeout=600) as client:  # fmt: skip
        model = args.model or (await client.models.list()).data[0].id
        prompts = make_prompts(args.num_requests, args.prompt_words, args.seed)
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: str) -> Result:
            async with gate:
                return await one_request(client, model, prompt, args.max_tokens)

        # Warm-up: the first request pays one-time costs (allocations, caches) that are not serving speed.
        await one_request(client, model, "warm up", 4)
        started = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return model, results, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model, results, elapsed = asyncio.run(run(args))
    ttft = [r.ttft for r in results]
    total_tokens = sum(r.output_tokens for r in results)
    metrics = httpx.get(args.base_url.rstrip("/") + "/metrics", timeout=10)
    max_batch = next((line.split()[-1] for line in metrics.text.splitlines()
                      if line.startswith("nanoserve_max_seqs_in_step ")), "n/a")  # fmt: skip
    print(f"model {model}: {len(results)} requests, concurrency {args.concurrency}, "
          f"{args.max_tokens} output tokens each, prompts of {args.prompt_words} words")  # fmt: skip
    print(f"  wall time          {elapsed:8.2f} s")
    print(f"  output tokens/s    {total_tokens / elapsed:8.1f}   ({total_tokens} tokens)")
    print(f"  requests/s         {len(results) / elapsed:8.2f}")
    print(f"  TTFT p50 / p99     {percentile(ttft, 50) * 1000:8.1f} / {percentile(ttft, 99) * 1000:.1f} ms")
    per_token = [(r.latency - r.ttft) / max(1, r.output_tokens - 1) for r in results]
    print(f"  inter-token p50    {percentile(per_token, 50) * 1000:8.1f} ms")
    print(f"  server's largest batch (sequences in one step): {max_batch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
