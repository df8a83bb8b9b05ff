"""A randomised workload against the engine: hundreds of requests with random lengths, shared prefixes,
n>1, random aborts, a KV cache far too small for the traffic (constant preemption) and chunked prefill.

At the end every block is free, every request ended with a reason, and the greedy tokens of every request
that was not aborted equal what the same request produces alone in a roomy engine (up to a near-tie in the
alone run, where batching may legitimately flip the choice: float sums in another order).
"""

from __future__ import annotations

import random

from nanoserve import LLM, SamplingParams
from tests.conftest import FIRST_PLAIN_TOKEN, assert_all_blocks_free

NEAR_TIE = 1e-4  # top-1 minus top-2 log-probability below this: either token is a correct greedy choice
NUM_REQUESTS = 240


def _workload(seed: int) -> list[tuple[list[int], SamplingParams, int | None]]:
    """(prompt, params, step at which to abort or None)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(FIRST_PLAIN_TOKEN, 500) for _ in range(rng.choice([4, 8, 12]))] for _ in range(5)]
    work = []
    for _ in range(NUM_REQUESTS):
        prefix = rng.choice(prefixes) if rng.random() < 0.6 else []
        prompt = prefix + [rng.randrange(FIRST_PLAIN_TOKEN, 500) for _ in range(rng.randint(1, 24))]
        params = SamplingParams(
            temperature=0, max_tokens=rng.randint(1, 14), ignore_eos=True, n=rng.choice([1, 1, 1, 2])
        )
        abort_at = rng.randint(0, 60) if rng.random() < 0.15 else None
        work.append((prompt, params, abort_at))
    return work


def test_random_workload_loses_nothing_and_matches_alone(checkpoint) -> None:
    path = str(checkpoint("qwen3-gqa"))
    work = _workload(seed=2026)
    # 24 blocks of 4 tokens: a handful of sequences at a time, so admission stalls and preemption is constant.
    llm = LLM(path, kv_cache_memory=24 * 4096, block_size=4, max_model_len=48, max_num_batched_tokens=16, max_num_seqs=8)
    engine = llm.engine
    rng = random.Random(7)
    pending = list(enumerate(work))
    results = {}
    aborts: dict[int, list[str]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        # Requests arrive a few at a time while the engine runs.
        for _ in range(rng.randint(0, 4)):
            if pending:
                i, (prompt, params, abort_at) = pending.pop(0)
                engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
                if abort_at is not None:
                    aborts.setdefault(step + abort_at, []).append(str(i))
        for request_id in aborts.pop(step, []):
            out = engine.abort_request(request_id)
            if out is not None:
                results[int(request_id)] = out
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out
        step += 1
        assert step < 20_000, "the workload did not drain"
    for request_ids in aborts.values():  # aborts scheduled after their request finished: nothing to do
        for request_id in request_ids:
            assert engine.abort_request(request_id) is None

    assert engine.scheduler.num_preemptions > 20, "the budget was meant to force constant preemption"
    assert_all_blocks_free(engine)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.scheduler.num_finished == engine.scheduler.num_admitted
    assert sorted(results) == list(range(NUM_REQUESTS)), "a request never reported a final output"
    reasons = {c.finish_reason for r in results.values() for c in r.outputs}
    assert reasons <= {"length", "abort"} and "abort" in reasons
    llm.close()

    # The same requests alone, in an engine with room to spare.
    completed = [i for i, r in results.items() if all(c.finish_reason == "length" for c in r.outputs)]
    with LLM(path, kv_cache_memory="4MiB", block_size=4, max_model_len=48) as roomy:
        checked_tokens = 0
        for i in completed:
            prompt, params, _ = work[i]
            alone_params = SamplingParams(temperature=0, max_tokens=params.max_tokens, ignore_eos=True, logprobs=1)
            alone = roomy.generate({"prompt_token_ids": prompt}, alone_params, use_tqdm=False)[0].outputs[0]
            for completion in results[i].outputs:
                assert len(completion.token_ids) == params.max_tokens
                for pos, (got, want) in enumerate(zip(completion.token_ids, alone.token_ids)):
                    if got != want:
                        top = sorted(alone.logprobs[pos].values(), key=lambda lp: -lp.logprob)
                        gap = top[0].logprob - top[1].logprob
                        assert gap < NEAR_TIE, f"request {i} sample {completion.index} differs at {pos} (gap {gap:.2e})"
                        break
                    checked_tokens += 1
        assert checked_tokens > 500
