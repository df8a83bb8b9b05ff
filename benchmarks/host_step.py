"""Host work per decode step at 1k and 8k context: it must not grow with the length of the run.

One request on a tiny checkpoint (so the model's own time is small and known), with everything that used to
cost per-step work proportional to the sequence: prefix caching on, repetition / presence / frequency
penalties, logprobs, a stop string, and a streaming consumer's outputs (delta outputs where the engine has
them). The time of ``executor.execute`` (the model) is subtracted from each step; what remains is the
engine's host work: scheduling, block bookkeeping, sampling, detokenizing, building outputs.

    python benchmarks/host_step.py                  # 1k and 8k context, 64 decode steps each
    PYTHONPATH=/path/to/old/checkout python benchmarks/host_step.py    # the same on another version

Run it with the invariant checks off (they rehash every block each step by design); the script refuses
otherwise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def measure(model: str, context: int, steps: int) -> tuple[float, float]:
    """(median host ms per decode step, median model ms per step) at ``context`` tokens."""
    from nanoserve.config import EngineConfig
    from nanoserve.engine.llm_engine import LLMEngine
    from nanoserve.sampling_params import SamplingParams

    config = EngineConfig.create(model, max_model_len=context + steps + 8, kv_cache_memory="64MiB",
                                 max_num_batched_tokens=context + steps + 8)  # fmt: skip
    engine = LLMEngine(config)
    kwargs = dict(max_tokens=steps, ignore_eos=True, temperature=0.8, seed=1, logprobs=2, stop=["zzqzz"],
                  repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1)  # fmt: skip
    try:
        from nanoserve.sampling_params import RequestOutputKind

        kwargs["output_kind"] = RequestOutputKind.DELTA  # what a streaming server asks for
    except ImportError:  # an engine without output kinds returns cumulative outputs
        pass
    model_time = [0.0]
    execute = engine.executor.execute

    def timed_execute(step):  # noqa: ANN001, ANN202 - wraps whatever the executor takes
        t = time.perf_counter()
        try:
            return execute(step)
        finally:
            model_time[0] += time.perf_counter() - t

    engine.executor.execute = timed_execute
    prompt = [(i * 7919) % 500 + 3 for i in range(context)]
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(**kwargs))
    host, model_ms = [], []
    try:
        engine.step()  # the prefill (one chunk)
        while engine.has_unfinished_requests():
            model_time[0] = 0.0
            t = time.perf_counter()
            engine.step()
            total = time.perf_counter() - t
            host.append((total - model_time[0]) * 1e3)
            model_ms.append(model_time[0] * 1e3)
    finally:
        engine.shutdown()
    return statistics.median(host), statistics.median(model_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="1024,8192")
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    if os.environ.get("NANOSERVE_CHECK_INVARIANTS", "") not in ("", "0"):
        raise SystemExit("unset NANOSERVE_CHECK_INVARIANTS: the checks rehash every block each step by design")
    import nanoserve
    from nanoserve.testing.checkpoints import build_checkpoint

    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_checkpoint(Path(tmp) / "tiny", "qwen3", max_position_embeddings=max(contexts) + 2 * args.steps))
        print(f"nanoserve from {Path(nanoserve.__file__).parent}; tiny qwen3, {args.steps} decode steps per context")
        print(f"{'context':>8} {'host ms/step':>13} {'model ms/step':>14}")
        for context in contexts:
            host, model_ms = measure(model, context, args.steps)
            print(f"{context:>8} {host:>13.3f} {model_ms:>14.3f}")


if __name__ == "__main__":
    main()
