"""The accounting checks the engine runs after every step (``NANOSERVE_CHECK_INVARIANTS=1``, on for the whole
test suite) must catch each kind of corruption they claim to — otherwise every test that "passed with the
checks on" proves less than it says.

Claimed: every block is free or referenced; ref counts equal the number of sequences holding a block; the
prefix-cache index points only at blocks whose contents match their hash (recomputed from the tokens of the
sequences holding them, not read back from a memo); waiting + running + finished equals everything admitted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from nanoserve.config import EngineConfig
from nanoserve.engine.llm_engine import LLMEngine
from nanoserve.engine.scheduler import Scheduler, SchedulerLimits
from nanoserve.engine.sequence import Sequence
from nanoserve.kvcache.block_manager import BlockManager
from nanoserve.sampling_params import SamplingParams

BS = 4


@dataclass(eq=False)
class Holder:
    """The BlockHolder protocol: what the block manager sees of a sequence."""

    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_computed_tokens: int = 0


def admitted(bm: BlockManager, tokens: list[int]) -> Holder:
    """A sequence admitted with prefix-cache lookup, its whole prompt computed and its full blocks hashed."""
    seq = Holder(list(tokens))
    reused = bm.find_cached_prefix(seq)
    num_new = len(tokens) - len(reused) * BS
    assert bm.allocate(seq, reused, num_new)
    seq.num_computed_tokens += num_new
    bm.cache_full_blocks(seq)
    return seq


@pytest.fixture
def shared() -> tuple[BlockManager, Holder, Holder]:
    """Two sequences sharing two hashed prefix blocks (the second got them from the prefix cache)."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = admitted(bm, list(range(10, 21)))
    b = admitted(bm, list(range(10, 18)) + [99, 98, 97])
    assert b.block_ids[:2] == a.block_ids[:2]
    bm.check_integrity([a, b])
    return bm, a, b


def test_block_shared_under_a_hash_its_holder_tokens_do_not_match(shared) -> None:
    """b holds a's hashed block 1, but b's tokens in it differ: a prefix hit handed out the wrong KV. The memo
    (computed from the tokens before they changed) still agrees with the block, so only recomputing the hash
    from the tokens catches it."""
    bm, a, b = shared
    b.token_ids[5] = 77
    with pytest.raises(AssertionError, match="hash"):
        bm.check_integrity([a, b])


def test_hashed_block_beyond_the_holder_tokens(shared) -> None:
    """A hashed (so: full) block held where its holder has fewer tokens than the block covers."""
    bm, a, b = shared
    del b.token_ids[6:]
    b.block_hashes = b.block_hashes[:1]
    with pytest.raises(AssertionError):
        bm.check_integrity([a, b])


def test_stale_hash_memo(shared) -> None:
    bm, a, b = shared
    a.block_hashes[0] ^= 1
    with pytest.raises(AssertionError):
        bm.check_integrity([a, b])


def test_ref_count_and_free_queue_disagreements(shared) -> None:
    bm, a, b = shared
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_integrity([a])  # b's references are counted but b is not a holder: a leak
    bm.blocks[a.block_ids[-1]].ref_count += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_integrity([a, b])
    bm.blocks[a.block_ids[-1]].ref_count -= 1
    free_block = next(blk for blk in bm.blocks if blk.ref_count == 0)
    bm._free.pop(free_block.block_id)  # neither free nor referenced: lost for good
    with pytest.raises(AssertionError, match="free"):
        bm.check_integrity([a, b])


def test_prefix_index_pointing_at_a_block_with_another_hash(shared) -> None:
    bm, a, b = shared
    h = a.block_hashes[0]
    bm._cached[h] = a.block_ids[1]
    with pytest.raises(AssertionError, match="stale"):
        bm.check_integrity([a, b])


def test_a_sequence_lost_by_the_scheduler_is_caught() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    sched = Scheduler(SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), bm)
    seqs = [Sequence(i, f"r{i}", 0, [5, 6, 7], 3, SamplingParams(max_tokens=4)) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    sched.schedule()
    sched.check_integrity()
    sched.waiting.append(sched.running.pop())  # back in the queue but still marked running
    with pytest.raises(AssertionError):
        sched.check_integrity()
    seq = sched.waiting.pop()
    bm.free(seq)  # dropped: neither waiting, running nor finished
    with pytest.raises(AssertionError, match="lost"):
        sched.check_integrity()


def test_the_engine_checks_after_every_step_in_this_suite(checkpoint) -> None:
    """The suite's conftest turns the checks on; a corruption between two steps fails the very next step."""
    assert os.environ.get("NANOSERVE_CHECK_INVARIANTS") == "1"
    engine = LLMEngine(EngineConfig.create(str(checkpoint("qwen3-gqa")), max_model_len=64, kv_cache_memory="1MiB"))
    try:
        assert engine.check_invariants
        engine.add_request("r", {"prompt_token_ids": list(range(3, 30))}, SamplingParams(max_tokens=8))
        engine.step()
        held = engine.scheduler.running[0].block_ids[0]
        engine.block_manager.blocks[held].ref_count += 1
        with pytest.raises(AssertionError, match="ref_count"):
            engine.step()
    finally:
        engine.shutdown()
