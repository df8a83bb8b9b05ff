"""The model runner's step inputs: the decode-only fast path builds exactly what the general path builds."""

from __future__ import annotations

import random

import numpy as np
import torch

from nanoserve.engine.step import ScheduledChunk
from nanoserve.runner.model_runner import ModelRunner


def _runner(block_size: int, tables: dict[int, list[int]]) -> ModelRunner:
    runner = object.__new__(ModelRunner)  # only the step bookkeeping: no model
    runner.block_size, runner.block_tables, runner.device = block_size, tables, torch.device("cpu")
    return runner


def _assert_same(a: tuple, b: tuple) -> None:
    ids_a, pos_a, meta_a, rows_a, first_a = a
    ids_b, pos_b, meta_b, rows_b, first_b = b
    for x, y in ((ids_a, ids_b), (pos_a, pos_b), (rows_a, rows_b), (meta_a.slot_mapping, meta_b.slot_mapping),
                 (meta_a.decode_block_tables, meta_b.decode_block_tables),
                 (meta_a.decode_context_lens, meta_b.decode_context_lens)):  # fmt: skip
        assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and torch.equal(x, y), (x, y)
    assert np.array_equal(first_a, first_b)
    assert meta_a.num_decode_tokens == meta_b.num_decode_tokens
    assert meta_a.decode_max_context == meta_b.decode_max_context
    assert meta_a.prefill_query_starts == meta_b.prefill_query_starts == []
    assert meta_a.prefill_query_lens == meta_b.prefill_query_lens == []
    assert meta_a.prefill_context_lens == meta_b.prefill_context_lens == []
    assert meta_a.prefill_block_tables == meta_b.prefill_block_tables == []


def test_decode_steps_take_the_fast_path_and_build_what_the_general_path_builds() -> None:
    rng = random.Random(0)
    for _ in range(200):
        block_size = rng.choice([1, 4, 16])
        n = rng.randint(1, 9)
        tables, chunks = {}, []
        for seq_id in rng.sample(range(100), n):  # sequences in no particular order
            start = rng.randint(1, 80)
            needed = start // block_size + 1
            # a table may hold blocks past the token's (allocated ahead); block ids out of order
            tables[seq_id] = rng.sample(range(1, 500), needed + rng.randint(0, 2))
            chunks.append(ScheduledChunk(seq_id, start, [rng.randrange(1000)], [], False, rng.random() < 0.8))
        runner = _runner(block_size, tables)
        fast = runner._prepare_decode(chunks)
        _assert_same(fast, runner._prepare_mixed(chunks))
        _assert_same(runner._prepare(chunks), fast)
        slots = fast[2].slot_mapping.tolist()
        for c, slot in zip(chunks, slots):  # the slot of each new token, from its own table
            assert slot == tables[c.seq_id][c.start // block_size] * block_size + c.start % block_size


def test_a_step_with_a_prefill_chunk_takes_the_general_path() -> None:
    tables = {1: [3, 4], 2: [7]}
    chunks = [ScheduledChunk(1, 20, [5], [], False, True), ScheduledChunk(2, 0, [8, 9, 10], [7], True, True)]
    runner = _runner(16, tables)
    input_ids, positions, meta, sample_rows, first_rows = runner._prepare(chunks)
    assert meta.num_decode_tokens == 1 and meta.prefill_query_lens == [3]
    assert input_ids.tolist() == [5, 8, 9, 10] and positions.tolist() == [20, 0, 1, 2]
    assert sample_rows.tolist() == [0, 3] and first_rows.tolist() == [0, 1]
