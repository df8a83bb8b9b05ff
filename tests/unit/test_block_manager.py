"""BlockManager: reference counts, hash-chained prefix caching, LRU eviction, and a stateful property test.

The block manager is pure Python, so it is driven here by a tiny stand-in for a sequence. The property test
also plays the model runner: it records which tokens were "written" into which block, so every prefix-cache
hit can be checked against what the block really holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanoserve.kvcache.block_manager import BlockManager, hash_block

BS = 4


@dataclass(eq=False)
class Seq:
    """What the block manager needs from a sequence (the BlockHolder protocol)."""

    token_ids: list[int]
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_computed_tokens: int = 0


def compute(bm: BlockManager, seq: Seq, num_tokens: int) -> None:
    """What one engine step does for ``seq``: make room, 'write' the KV, register the now-full blocks."""
    assert bm.append_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, seq: Seq, num_new_tokens: int | None = None) -> list[int]:
    """Look up the cached prefix and allocate; returns the reused block ids."""
    reused = bm.find_cached_prefix(seq)
    if num_new_tokens is None:
        num_new_tokens = len(seq.token_ids) - len(reused) * BS
    assert bm.allocate(seq, reused, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens
    bm.cache_full_blocks(seq)
    return reused


def ref_counts(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


# ------------------------------------------------------------------------------------------------ allocation


def test_allocate_append_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = Seq(list(range(10)))
    assert bm.allocate(seq, [], 10)
    assert len(seq.block_ids) == 3 and len(set(seq.block_ids)) == 3  # 10 tokens -> ceil(10 / 4) blocks
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    seq.num_computed_tokens = 10
    assert bm.append_slots(seq, 2)  # tokens 10, 11 still fit in block 2
    assert len(seq.block_ids) == 3
    assert bm.append_slots(seq, 3)  # 13 .. 15 tokens need a fourth block
    assert len(seq.block_ids) == 4 and bm.num_free_blocks == 4
    bm.check_integrity([seq])
    bm.free(seq)
    assert seq.block_ids == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and ref_counts(bm) == [0] * 8
    bm.check_integrity([])


def test_allocate_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    first = Seq(list(range(8)))
    admit(bm, first)  # 2 blocks, both cached
    other = Seq(list(range(100, 112)))  # needs 3 blocks, only 2 free
    before = (bm.num_free_blocks, ref_counts(bm))
    assert not bm.can_allocate(other, [], 12)
    assert not bm.allocate(other, [], 12)
    assert (bm.num_free_blocks, ref_counts(bm)) == before
    assert other.block_ids == [] and other.num_computed_tokens == 0
    assert not bm.append_slots(first, 12)  # first would need 3 more blocks
    assert len(first.block_ids) == 2
    bm.check_integrity([first])


def test_constructor_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=BS)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


# ------------------------------------------------------------------------------------------------ prefix caching


def test_prefix_hit_shares_blocks_while_both_run() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Seq(list(range(10)))
    admit(bm, a)  # blocks 0, 1 full and cached; block 2 half full
    b = Seq(list(range(8)) + [77, 78, 79])
    reused = admit(bm, b)
    assert reused == a.block_ids[:2]
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [bm.blocks[i].ref_count for i in a.block_ids] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4
    bm.check_integrity([a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_ids[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_evicted() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Seq(list(range(12)))
    admit(bm, a)
    held = list(a.block_ids)
    bm.free(a)
    assert bm.num_free_blocks == 16
    again = Seq(list(range(12)) + [5])
    assert bm.find_cached_prefix(again) == held  # all three blocks, although nobody holds them
    admit(bm, again)
    assert again.block_ids[:3] == held and again.num_computed_tokens == 13


def test_fully_cached_prompt_leaves_its_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Seq(list(range(12)))  # exactly 3 blocks
    admit(bm, a)
    same = Seq(list(range(12)))
    hit = bm.find_cached_prefix(same)
    # The model must still produce logits at the last prompt position, so at least one token is computed:
    # the last block is given up and recomputed.
    assert hit == a.block_ids[:2]
    assert bm.allocate(same, hit, 12 - 2 * BS)
    assert same.num_computed_tokens == 8 and len(same.block_ids) == 3
    assert same.block_ids[2] != a.block_ids[2]
    bm.check_integrity([a, same])


def test_hash_is_chained_on_the_whole_prefix() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    admit(bm, Seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block content, different first block: no hit at all (not even on block 1).
    assert bm.find_cached_prefix(Seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    # Same first block, different second: hit on the first only.
    assert len(bm.find_cached_prefix(Seq([1, 2, 3, 4, 5, 6, 7, 0, 9]))) == 1
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(hash_block(None, [0, 0, 0, 0]), [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == hash_block(None, [1, 2, 3, 4])


def test_partial_and_uncomputed_blocks_are_not_cached() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Seq(list(range(12)))
    assert bm.allocate(a, [], 6)  # room for 6 tokens; compute only 6 of 12 (a chunked prefill)
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    probe = Seq(list(range(12)) + [1])
    assert len(bm.find_cached_prefix(probe)) == 1  # block 1 is half written: not a hit
    compute(bm, a, 6)
    assert len(bm.find_cached_prefix(probe)) == 3


def test_duplicate_content_computed_twice_keeps_one_cache_entry() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a, b = Seq(list(range(9))), Seq(list(range(9)))
    # Both admitted in the same step, before either wrote anything: no hits, two copies of the same KV.
    assert bm.allocate(a, [], 9) and bm.allocate(b, [], 9)
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_full_blocks(s)
    bm.check_integrity([a, b])
    a_blocks = a.block_ids[:2]
    assert bm.find_cached_prefix(Seq(list(range(9)))) == a_blocks
    bm.free(a)
    bm.free(b)
    assert bm.find_cached_prefix(Seq(list(range(9)))) == a_blocks
    bm.check_integrity([])


def test_hits_are_counted_by_record_lookup() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    bm.record_lookup(10, 8)
    bm.record_lookup(6, 0)
    assert (bm.stats.queries, bm.stats.hits) == (16, 8)
    assert bm.stats.hit_rate == pytest.approx(0.5)


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = Seq(list(range(12)))
    admit(bm, a)
    assert all(bm.blocks[i].block_hash is None for i in a.block_ids)
    assert bm.find_cached_prefix(Seq(list(range(12)) + [1])) == []
    bm.record_lookup(12, 0)
    assert bm.stats.queries == 0


def test_reset_prefix_cache() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = Seq(list(range(12)))
    admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.find_cached_prefix(Seq(list(range(12)) + [1])) == []
    bm.check_integrity([])


def test_share_gives_parallel_samples_the_prompt_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = Seq(list(range(10)))
    admit(bm, first)
    second = Seq(list(range(10)))
    bm.share(first, second, 2)
    assert second.block_ids == first.block_ids[:2] and second.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in first.block_ids] == [2, 2, 1]
    compute(bm, second, 2)  # the rest of its prompt goes into a block of its own
    assert second.block_ids[2] != first.block_ids[2]
    bm.check_integrity([first, second])


# ------------------------------------------------------------------------------------------------ eviction order


def test_eviction_is_lru_tail_first_and_anonymous_blocks_go_first() -> None:
    bm = BlockManager(num_blocks=7, block_size=BS)
    old = Seq(list(range(100, 109)))  # 2 full cached blocks + 1 partial (anonymous) block
    new = Seq(list(range(200, 208)))  # 2 full cached blocks
    admit(bm, old)
    admit(bm, new)
    old_blocks, new_blocks = list(old.block_ids), list(new.block_ids)
    bm.free(old)  # freed first: least recently used
    bm.free(new)
    assert bm.num_free_blocks == 7

    def cached_blocks(tokens: list[int]) -> int:
        return len(bm.find_cached_prefix(Seq(tokens + [0])))

    taker = Seq(list(range(300, 300 + 6 * BS)))
    # Blocks holding nothing reusable go first: the two never used and old's partial (anonymous) block.
    assert bm.allocate(taker, [], 3 * BS)
    assert old_blocks[2] in taker.block_ids
    assert cached_blocks(list(range(100, 108))) == 2 and cached_blocks(list(range(200, 208))) == 2
    taker.num_computed_tokens = 3 * BS
    assert bm.append_slots(taker, 1)  # then old's blocks, tail first: old keeps only its first block
    assert taker.block_ids[-1] == old_blocks[1]
    assert cached_blocks(list(range(100, 108))) == 1 and cached_blocks(list(range(200, 208))) == 2
    taker.num_computed_tokens += 1
    assert bm.append_slots(taker, BS)  # old's head block goes before anything of the newer sequence
    assert taker.block_ids[-1] == old_blocks[0]
    assert cached_blocks(list(range(100, 108))) == 0 and cached_blocks(list(range(200, 208))) == 2
    assert set(new_blocks).isdisjoint(taker.block_ids)
    bm.check_integrity([taker])


def test_a_hit_makes_a_block_recently_used_again() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = Seq(list(range(100, 104)) + [1]), Seq(list(range(200, 204)) + [1])
    admit(bm, a)
    admit(bm, b)
    a_block, b_block = a.block_ids[0], b.block_ids[0]
    bm.free(a)
    bm.free(b)
    # Touch a's cached block again (a hit), then release it: now b's block is the least recently used.
    a2 = Seq(list(range(100, 104)) + [2])
    assert admit(bm, a2) == [a_block]
    bm.free(a2)
    taker = Seq(list(range(300, 316)))
    assert bm.allocate(taker, [], 3 * BS)  # two anonymous blocks, then the LRU cached one
    assert b_block in taker.block_ids and a_block not in taker.block_ids
    assert len(bm.find_cached_prefix(Seq(list(range(100, 104)) + [3]))) == 1
    assert bm.find_cached_prefix(Seq(list(range(200, 204)) + [3])) == []


def test_evicted_block_is_no_longer_a_hit() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = Seq(list(range(8)))
    admit(bm, a)
    bm.free(a)
    other = Seq(list(range(50, 58)))
    admit(bm, other)  # overwrites both blocks
    assert bm.find_cached_prefix(Seq(list(range(8)) + [1])) == []
    bm.check_integrity([other])


def test_check_integrity_detects_corruption() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = Seq(list(range(8)))
    admit(bm, a)
    bm.check_integrity([a])
    with pytest.raises(AssertionError):
        bm.check_integrity([])  # a's blocks are counted but nobody holds them
    bm.blocks[a.block_ids[0]].ref_count += 1
    with pytest.raises(AssertionError):
        bm.check_integrity([a])
    bm.blocks[a.block_ids[0]].ref_count -= 1
    bm.blocks[a.block_ids[1]].block_hash = 12345
    with pytest.raises(AssertionError):
        bm.check_integrity([a])


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = Seq(list(range(8)))
    admit(bm, a)
    blocks = list(a.block_ids)
    bm.free(a)
    a.block_ids = blocks  # a stale table freed again
    with pytest.raises(AssertionError):
        bm.free(a)


# ------------------------------------------------------------------------------------------------ property test

# Three "documents" over a tiny alphabet: prompts are prefixes of them plus noise, so prefix hits, shared
# blocks and evictions of shared prefixes all happen often.
DOCS = [[(7 * d + 3 * i) % 5 for i in range(40)] for d in range(3)]
NUM_BLOCKS = 12


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / step / free / preempt / re-admit / share sequences against one BlockManager.

    Shadow state: ``written[b]`` is the token prefix whose last block's KV is stored in block ``b`` (set when
    the block fills up). A prefix hit on block ``b`` for prefix ``p`` is only correct if ``written[b] == p``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BS)
        self.running: list[Seq] = []
        self.waiting: list[Seq] = []
        self.written: dict[int, tuple[int, ...]] = {}

    @initialize(caching=st.booleans())
    def setup(self, caching: bool) -> None:
        self.bm = BlockManager(NUM_BLOCKS, BS, enable_prefix_caching=caching)

    # ---- helpers ----------------------------------------------------------------------------------------
    def _check_hit(self, seq: Seq, reused: list[int]) -> None:
        assert len(reused) * BS < len(seq.token_ids), "a hit must leave at least one token to compute"
        for i, block_id in enumerate(reused):
            assert self.written.get(block_id) == tuple(seq.token_ids[: (i + 1) * BS]), (
                f"prefix hit on block {block_id} for block {i} of {seq.token_ids}, but it holds "
                f"{self.written.get(block_id)}"
            )

    def _write(self, seq: Seq, num_tokens: int) -> None:
        """The runner writes KV for positions [computed, computed + num_tokens)."""
        start = seq.num_computed_tokens
        for pos in range(start, start + num_tokens):
            block_id = seq.block_ids[pos // BS]
            # Only a block no one else holds may be written; a shared block is read-only.
            assert self.bm.blocks[block_id].ref_count == 1, f"writing into shared block {block_id}"
            if pos % BS == 0:
                self.written.pop(block_id, None)
            if pos % BS == BS - 1:
                self.written[block_id] = tuple(seq.token_ids[: pos + 1])
        seq.num_computed_tokens += num_tokens
        self.bm.cache_full_blocks(seq)

    def _try_admit(self, seq: Seq, chunk: int) -> bool:
        reused = self.bm.find_cached_prefix(seq)
        self._check_hit(seq, reused)
        num_new = min(chunk, len(seq.token_ids) - len(reused) * BS)
        before = (self.bm.num_free_blocks, [b.ref_count for b in self.bm.blocks])
        if not self.bm.allocate(seq, reused, num_new):
            assert (self.bm.num_free_blocks, [b.ref_count for b in self.bm.blocks]) == before
            assert seq.block_ids == [] and seq.num_computed_tokens == 0
            return False
        assert seq.num_computed_tokens == len(reused) * BS and seq.block_ids[: len(reused)] == reused
        self._write(seq, num_new)
        self.running.append(seq)
        return True

    # ---- rules ------------------------------------------------------------------------------------------
    @rule(doc=st.integers(0, 2), prefix=st.integers(0, 40), noise=st.lists(st.integers(0, 4), max_size=6),
          chunk=st.integers(1, 48))  # fmt: skip
    def add(self, doc: int, prefix: int, noise: list[int], chunk: int) -> None:
        tokens = DOCS[doc][:prefix] + noise
        if not tokens:
            return
        seq = Seq(tokens)
        if not self._try_admit(seq, chunk):
            self.waiting.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), n=st.integers(1, 9), token=st.integers(0, 4))
    def step(self, data: st.DataObject, n: int, token: int) -> None:
        seq = data.draw(st.sampled_from(self.running))
        if seq.num_computed_tokens == len(seq.token_ids):
            seq.token_ids.append(token)  # decoding: the token sampled last step needs its KV
        num_new = min(n, len(seq.token_ids) - seq.num_computed_tokens)
        blocks_before = list(seq.block_ids)
        if self.bm.append_slots(seq, num_new):
            assert seq.block_ids[: len(blocks_before)] == blocks_before
            assert len(seq.block_ids) == -(-(seq.num_computed_tokens + num_new) // BS)
            self._write(seq, num_new)
        else:
            assert seq.block_ids == blocks_before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.running))
        self.running.remove(seq)
        self.bm.free(seq)
        assert seq.block_ids == []

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.running))
        self.running.remove(seq)
        self.bm.free(seq)
        assert seq.block_ids == [] and seq.num_computed_tokens == 0
        self.waiting.append(seq)  # keeps its tokens (prompt + generated) to recompute later

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), chunk=st.integers(1, 48))
    def readmit(self, data: st.DataObject, chunk: int) -> None:
        seq = data.draw(st.sampled_from(self.waiting))
        if self._try_admit(seq, chunk):
            self.waiting.remove(seq)

    @precondition(lambda self: any(s.num_computed_tokens >= BS for s in self.running))
    @rule(data=st.data(), noise=st.lists(st.integers(0, 4), min_size=1, max_size=4))
    def share(self, data: st.DataObject, noise: list[int]) -> None:
        src = data.draw(st.sampled_from([s for s in self.running if s.num_computed_tokens >= BS]))
        k = data.draw(st.integers(1, min(src.num_computed_tokens // BS, len(src.block_ids))))
        dst = Seq(src.token_ids[: k * BS] + noise)
        refs = [self.bm.blocks[b].ref_count for b in src.block_ids[:k]]
        self.bm.share(src, dst, k)
        assert [self.bm.blocks[b].ref_count for b in src.block_ids[:k]] == [r + 1 for r in refs]
        assert dst.num_computed_tokens == k * BS
        self.running.append(dst)

    # ---- invariants -------------------------------------------------------------------------------------
    @invariant()
    def accounting_holds(self) -> None:
        bm = self.bm
        bm.check_integrity(self.running)
        held: dict[int, int] = {}
        for seq in self.running:
            assert len(seq.block_ids) == len(set(seq.block_ids)), "a block twice in one table"
            assert len(seq.block_ids) * BS >= seq.num_computed_tokens
            for b in seq.block_ids:
                held[b] = held.get(b, 0) + 1
        assert all(seq.block_ids == [] for seq in self.waiting)
        assert all(b.ref_count >= 0 for b in bm.blocks)
        assert all(bm.blocks[b].ref_count == n for b, n in held.items())
        # No block is both free and used: the used ones and the free ones partition the pool.
        assert len(held) + bm.num_free_blocks == bm.num_blocks

    def teardown(self) -> None:
        for seq in self.running:
            self.bm.free(seq)
        self.running.clear()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(b.ref_count == 0 for b in self.bm.blocks)
        self.bm.check_integrity([])


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
