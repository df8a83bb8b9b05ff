"""Every rank forgets a finished sequence's block table, also when no step follows (a drained engine), and
aborts while idle reach the ranks too."""

from __future__ import annotations

import pytest

from nanoserve import LLM, SamplingParams
from tests.distributed.conftest import make_prompts


@pytest.mark.parametrize("tp", [1, 2])
def test_every_rank_holds_no_table_after_a_drained_run(tp_checkpoints, tp: int) -> None:
    with LLM(tp_checkpoints("qwen3-gqa"), tensor_parallel_size=tp, kv_cache_memory="2MiB", block_size=4) as llm:
        engine = llm.engine
        prompts = make_prompts(5, seed=3)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert not engine.has_unfinished_requests()
        assert engine.runner_block_table_counts() == [0] * tp

        # An abort while the engine idles between steps: released at once, not with some later step.
        engine.add_request("a", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        assert engine.runner_block_table_counts() == [1] * tp
        engine.abort_request("a")
        assert engine.runner_block_table_counts() == [0] * tp
