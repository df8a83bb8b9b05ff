"""Block manager: fixed-size KV blocks with reference counts and hash-chained prefix caching.

A sequence's KV lives in a list of block ids (its block table); token ``i`` sits in block
``block_ids[i // block_size]`` at offset ``i % block_size``::

    tokens:      t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    block_ids:   [    17     |     4       |   23   ]   (block_size = 4)
    hashes:      h0=H(-,t0..t3)  h1=H(h0,t4..t7)        (only full blocks are hashed)

A full block is keyed by the hash of *all* tokens up to its end (each hash chains its parent), so equal
hashes mean equal prefixes. Blocks whose reference count drops to zero go to the free queue but keep their
hash: a later prompt with the same prefix takes them back (a prefix-cache hit) until allocation evicts them,
oldest first (LRU).

Invariants (checked by :meth:`check_integrity`): a block's ref count equals the number of sequences holding
it; ref count 0 <=> in the free queue; the hash index points only at blocks carrying that hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import xxhash


class BlockHolder(Protocol):
    """What the block manager needs from a sequence."""

    token_ids: list[int]
    block_ids: list[int]
    block_hashes: list[int]
    num_computed_tokens: int
    num_hashed_blocks: int  # blocks of the table cache_full_blocks has looked at (owned by the block manager)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block(parent_hash: int | None, tokens: SequenceABC[int]) -> int:
    """128-bit hash of a full block, chained on its parent's so it identifies the whole prefix."""
    h = xxhash.xxh3_128()
    if parent_hash is not None:
        h.update(parent_hash.to_bytes(16, "little"))
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.intdigest()


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {self.num_blocks}x{self.block_size}")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        # Free blocks in eviction order (front = evicted first). Values unused: an ordered set.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: BlockHolder) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``'s tokens, as full blocks.

        At least the last token is always left to compute (its logits are needed), so a prompt covered
        entirely by cached blocks gives up its last block and recomputes it into a fresh one.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hashes = self._hashes(seq, max_blocks)
        hit: list[int] = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted lookup (a waiting sequence may be looked up several times before it fits)."""
        if self.enable_prefix_caching:
            self.stats.queries += num_query_tokens
            self.stats.hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------------------------
    def can_allocate(self, seq: BlockHolder, reused: list[int], num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether :meth:`allocate` would succeed and still leave ``reserve`` blocks free."""
        num_reused_free = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        total_tokens = len(reused) * self.block_size + num_new_tokens
        return self.blocks_needed(total_tokens) - len(reused) + num_reused_free + reserve <= len(self._free)

    def allocate(self, seq: BlockHolder, reused: list[int], num_new_tokens: int) -> bool:
        """Give a sequence that holds no blocks the ``reused`` prefix blocks plus room for ``num_new_tokens``
        more. Sets ``num_computed_tokens`` to the reused prefix. False (and no change) if it does not fit."""
        assert not seq.block_ids, "allocate() is for sequences without blocks"
        if not self.can_allocate(seq, reused, num_new_tokens):
            return False
        for block_id in reused:
            self._take(block_id)
        seq.block_ids = list(reused)
        seq.num_computed_tokens = len(reused) * self.block_size
        seq.num_hashed_blocks = 0
        return self.append_slots(seq, num_new_tokens)

    def append_slots(self, seq: BlockHolder, num_new_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_new_tokens`` beyond its computed tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        for _ in range(needed):
            seq.block_ids.append(self._take(self._evict_one()))
        return True

    def share(self, src: BlockHolder, dst: BlockHolder, num_blocks: int) -> None:
        """Let ``dst`` (holding nothing) reuse ``src``'s first ``num_blocks`` full blocks (parallel samples)."""
        assert not dst.block_ids
        for block_id in src.block_ids[:num_blocks]:
            self._take(block_id)
        dst.block_ids = list(src.block_ids[:num_blocks])
        dst.num_computed_tokens = num_blocks * self.block_size
        dst.num_hashed_blocks = 0

    def free(self, seq: BlockHolder) -> None:
        """Drop ``seq``'s references. Tail blocks are released first so they are evicted first."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    # Nothing to reuse in it: evict before blocks that may still serve a prefix hit.
                    self._free.move_to_end(block_id, last=False)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def cache_full_blocks(self, seq: BlockHolder) -> None:
        """Register the hashes of ``seq``'s blocks that became full and computed since the last call, so later
        prompts can hit them. Each block is looked at once per allocation: the work is proportional to the
        blocks the step filled, not to the length of the sequence."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        first = seq.num_hashed_blocks
        if num_full <= first:
            return
        self._extend_hashes(seq, num_full)
        seq.num_hashed_blocks = num_full
        for i in range(first, num_full):
            block_id, h = seq.block_ids[i], seq.block_hashes[i]
            block = self.blocks[block_id]
            if block.block_hash is not None:
                continue
            if h in self._cached:
                continue  # same content already cached in another block; keep this one anonymous
            block.block_hash = h
            self._cached[h] = block_id

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._cached.values()):
            self.blocks[block_id].block_hash = None
        self._cached.clear()

    # ---- internals -----------------------------------------------------------------------------------
    def _hashes(self, seq: BlockHolder, num_blocks: int) -> list[int]:
        """Hashes of ``seq``'s first ``num_blocks`` full blocks, extending its memo as needed."""
        self._extend_hashes(seq, num_blocks)
        return seq.block_hashes[:num_blocks]

    def _extend_hashes(self, seq: BlockHolder, num_blocks: int) -> None:
        """Grow ``seq``'s hash memo to at least ``num_blocks`` full blocks (each hash computed once)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1
        return block_id

    def _evict_one(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        self._free[block_id] = None  # _take() removes it again; keeps one code path for taking
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
        return block_id

    # ---- checks --------------------------------------------------------------------------------------
    def check_integrity(self, holders: Iterable[BlockHolder]) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent with the sequences holding blocks."""
        counts = [0] * self.num_blocks
        for seq in holders:
            for block_id in seq.block_ids:
                counts[block_id] += 1
            # Recompute the hash chain from the holder's tokens (not from its memo): a hashed block must be
            # full of the holder's tokens and carry exactly their hash, or a prefix hit served the wrong KV.
            bs = self.block_size
            parent: int | None = None
            for i, block_id in enumerate(seq.block_ids):
                tokens = seq.token_ids[i * bs : (i + 1) * bs]
                h = self.blocks[block_id].block_hash
                if len(tokens) < bs:
                    assert h is None, f"block {block_id} is hashed but its holder has only {len(tokens)} tokens in it"
                    break
                parent = hash_block(parent, tokens)
                if i < len(seq.block_hashes):
                    assert seq.block_hashes[i] == parent, f"hash memo of block {i} is stale"
                if h is not None:
                    assert h == parent, f"block {block_id} hash does not match its holder's tokens"
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but held {counts[block.block_id]} times"
            )
            assert (block.ref_count == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_count {block.ref_count} but free={block.block_id in self._free}"
            )
        for h, block_id in self._cached.items():
            assert self.blocks[block_id].block_hash == h, f"cache index entry for block {block_id} is stale"
