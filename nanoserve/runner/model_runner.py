"""The model runner of one rank: builds the model (its shard), sizes and owns the KV cache, and executes
scheduled steps. Rank 0 gets logits back; other ranks run the same forward for the collectives."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.engine.step import PromptLogprobs, RunnerOutput, ScheduledChunk, StepInput
from nanoserve.layers import native
from nanoserve.layers.attention import AttentionMetadata
from nanoserve.models import shard
from nanoserve.models.decoder import BuildContext, head_dim_of
from nanoserve.models.loader import load_weights
from nanoserve.models.registry import resolve_architecture
from nanoserve.platform import default_attention_backend, pack_cpu_weights
from nanoserve.quantization.linear import finish_loading

logger = logging.getLogger(__name__)

# Positions per LM-head call when computing prompt log-probabilities (128 x 151,936 floats: 78 MB).
PROMPT_LOGPROBS_ROWS = 128


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup, show_progress: bool = False) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(config.device if config.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
        hf = config.hf_config
        model_cls = resolve_architecture(hf)
        ctx = BuildContext(
            dtype=config.dtype, tp=tp, attention_backend=default_attention_backend(config.device),
            max_position=config.max_model_len, kernels=native.kernels_for(config.dtype, self.device),
            quantization=config.quantization,
        )  # fmt: skip
        with torch.device(self.device):
            self.model = model_cls(hf, ctx)
        load_weights(self.model, config.model, show_progress=show_progress)
        if config.quantization is not None:
            finish_loading(self.model)
        self.model.eval()
        # Counted before packing: packing swaps dense weights for opaque copies of the same size.
        self._weight_bytes = shard.parameter_bytes(self.model)
        if pack_cpu_weights(config.device, config.dtype):
            self.model.pack_for_cpu()
        self.attention_layers = self.model.attention_layers()
        self.num_kv_heads = self.attention_layers[0].num_kv_heads
        self.head_dim = head_dim_of(hf)
        self.block_size = config.block_size
        self.num_blocks = 0
        self.block_tables: dict[int, list[int]] = {}  # seq_id -> block ids, mirrored from the scheduler

    # ---- KV cache ------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes one block takes on this rank across all layers (K and V). ``nanoserve plan`` predicts it with
        the same function, from the same layers built on the meta device."""
        return shard.kv_bytes_per_block(self.attention_layers, self.block_size, self.config.kv_cache_dtype)

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (tied tensors once), as loaded from the checkpoint."""
        return self._weight_bytes

    def allocate_kv_cache(self, num_blocks: int, short_layers: tuple[int, ...] = ()) -> list[int]:
        """Allocate ``num_blocks`` blocks in every attention layer and bind them; returns the count each layer
        really got, read back from its tensor, so the start-up check sees every layer rather than trusting one.

        ``short_layers`` (a testing aid, ``NANOSERVE_TEST_SHORT_KV``): these layers get one block fewer, so
        tests can show that check refusing to start.

        ``torch.empty``: pages are only touched when a block is written, so a large budget costs address
        space, not resident memory, until it is used.
        """
        for i, layer in enumerate(self.attention_layers):
            n = num_blocks - 1 if i in short_layers else num_blocks
            # The layout kv_bytes_per_block (and plan) count: [K/V, blocks, block_size, kv_heads, head_dim].
            shape = shard.kv_cache_shape(layer, max(0, n), self.block_size)
            layer.kv_cache = torch.empty(shape, dtype=self.config.kv_cache_dtype, device=self.device)
        per_layer = [int(layer.kv_cache.shape[1]) for layer in self.attention_layers]
        self.num_blocks = min(per_layer)
        if self.num_blocks > 0:
            self._zero_blocks([0])  # padding entries of block tables point at block 0
        return per_layer

    def release_kv_cache(self) -> None:
        """Drop the cache tensors (after a CUDA profiling run, before the real allocation)."""
        for layer in self.attention_layers:
            layer.kv_cache = torch.empty(0, dtype=self.config.kv_cache_dtype, device=self.device)
        self.num_blocks = 0

    def _zero_blocks(self, block_ids: list[int]) -> None:
        """Clear blocks before first use. The cache comes from torch.empty, and attention reads whole blocks
        (the unwritten tail of a sequence's last block, padding entries) under a mask: masked weights are 0,
        but 0 * NaN garbage is still NaN. Zeroing here keeps the cache's pages untouched until needed."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer in self.attention_layers:
            layer.kv_cache.index_fill_(1, index, 0)

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> RunnerOutput:
        """Run one scheduled step. On rank 0 the output holds logits [num_sampling_chunks, vocab] in chunk
        order (None on other ranks, or when no chunk samples); for a ``greedy`` step that the C decode step can
        take whole, the sampling chunks' next tokens instead, and no logits."""
        for seq_id in step.released_seq_ids:
            self.block_tables.pop(seq_id, None)
        fresh: list[int] = []
        for c in step.chunks:
            if c.reset:
                self.block_tables[c.seq_id] = list(c.block_ids)
                # Blocks wholly at or after the chunk's start are new; those before it hold a cached prefix.
                fresh.extend(c.block_ids[-(-c.start // self.block_size) :])
            elif c.block_ids:
                self.block_tables[c.seq_id].extend(c.block_ids)
                fresh.extend(c.block_ids)
        # Every rank answers in the same collective, so a table left on any rank shows in rank 0's report.
        num_tables = self.tp.gather_ints(len(self.block_tables)) if step.report_tables else None
        if not step.chunks:
            return RunnerOutput(None, num_tables)
        if fresh:
            self._zero_blocks(fresh)
        input_ids, positions, meta, sample_rows, first_rows = self._prepare(step.chunks)
        if step.greedy and self.tp.size == 1 and len(sample_rows) and not any(c.prompt_logprobs_targets for c in step.chunks):
            greedy_tokens = getattr(self.model, "greedy_tokens", None)
            tokens = greedy_tokens(input_ids, positions, meta) if greedy_tokens is not None else None
            if tokens is not None:  # the whole step and its argmax in one C call
                return RunnerOutput(None, num_tables, token_ids=tokens[sample_rows].tolist())
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden[sample_rows]) if len(sample_rows) else None
        prompt_logprobs = [
            self._prompt_logprobs(c, hidden, int(first_rows[i]))
            for i, c in enumerate(step.chunks) if c.prompt_logprobs_targets
        ]  # fmt: skip
        if self.tp.rank != 0:
            return RunnerOutput(None, num_tables)
        return RunnerOutput(logits, num_tables, prompt_logprobs)

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor, first_row: int) -> PromptLogprobs | None:
        """The chunk's prompt log-probabilities (rank 0; other ranks take part in the LM head's collectives and
        return None). The LM head runs over PROMPT_LOGPROBS_ROWS positions at a time: a 2,048-token prompt's
        logits at once would be 2,048 x vocabulary floats (1.2 GB for 151,936)."""
        targets = chunk.prompt_logprobs_targets
        k = chunk.prompt_logprobs_k
        row0 = first_row + chunk.logprobs_start - chunk.start
        out = PromptLogprobs(chunk.seq_id, chunk.logprobs_start, [], [], [], [])
        for lo in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
            hi = min(lo + PROMPT_LOGPROBS_ROWS, len(targets))
            logits = self.model.compute_logits(hidden[row0 + lo : row0 + hi])
            if self.tp.rank != 0:
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
            wanted = torch.tensor(targets[lo:hi], device=logprobs.device)
            chosen = logprobs.gather(1, wanted[:, None])  # [n, 1]
            out.token_logprobs += chosen.squeeze(1).tolist()
            out.token_ranks += ((logprobs > chosen).sum(dim=1) + 1).tolist()
            if k:
                top_lp, top_ids = logprobs.topk(k, dim=-1)
                out.top_ids += top_ids.tolist()
                out.top_logprobs += top_lp.tolist()
            else:
                out.top_ids += [[] for _ in range(hi - lo)]
                out.top_logprobs += [[] for _ in range(hi - lo)]
        return out if self.tp.rank == 0 else None

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, np.ndarray]:
        """(input ids, positions, attention metadata, rows to sample, each chunk's first row) of one step."""
        if all(len(c.token_ids) == 1 and c.start > 0 for c in chunks):
            return self._prepare_decode(chunks)
        return self._prepare_mixed(chunks)

    def _prepare_decode(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, np.ndarray]:
        """:meth:`_prepare_mixed`'s result for a step of single-token decodes only (every step of a steady batch),
        from Python lists: the chunks keep their order and each is one row. On a 2-core host the general path's
        token bookkeeping took 84 us of a SmolLM2-135M int4 step (~3 %), this 56 us."""
        bs = self.block_size
        tables = [self.block_tables[c.seq_id] for c in chunks]
        table_array = np.zeros((len(chunks), max(map(len, tables))), dtype=np.int64)
        for row, t in enumerate(tables):
            table_array[row, : len(t)] = t
        starts = [c.start for c in chunks]
        dev = self.device
        positions = torch.tensor(starts, dtype=torch.int64)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, starts)], device=dev),
            num_decode_tokens=len(chunks),
            decode_block_tables=torch.from_numpy(table_array).to(dev),
            decode_context_lens=(positions + 1).to(dev),
            decode_max_context=max(starts) + 1,
            prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[], prefill_block_tables=[],
        )  # fmt: skip
        sample_rows = torch.tensor([i for i, c in enumerate(chunks) if c.sample], dtype=torch.int64, device=dev)
        input_ids = torch.tensor([c.token_ids[0] for c in chunks], dtype=torch.int64, device=dev)
        return input_ids, positions.to(dev), meta, sample_rows, np.arange(len(chunks), dtype=np.int64)

    def _prepare_mixed(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, np.ndarray]:
        bs = self.block_size
        # Decodes first so attention can batch them; remember where each chunk's last token lands.
        decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1 and c.start > 0]
        prefill = [i for i, c in enumerate(chunks) if not (len(c.token_ids) == 1 and c.start > 0)]
        order = decode + prefill
        ordered = [chunks[i] for i in order]
        lens = np.fromiter((len(c.token_ids) for c in ordered), dtype=np.int64, count=len(ordered))
        starts = np.fromiter((c.start for c in ordered), dtype=np.int64, count=len(ordered))
        offsets = np.concatenate(([0], np.cumsum(lens)))
        total = int(offsets[-1])
        seq_of_token = np.repeat(np.arange(len(ordered)), lens)
        positions = np.arange(total) - offsets[:-1][seq_of_token] + starts[seq_of_token]

        tables = [self.block_tables[c.seq_id] for c in ordered]
        max_blocks = max(len(t) for t in tables)
        table_array = np.zeros((len(ordered), max_blocks), dtype=np.int64)
        for row, t in enumerate(tables):
            table_array[row, : len(t)] = t
        slots = table_array[seq_of_token, positions // bs] * bs + positions % bs

        input_ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in ordered), dtype=np.int64, count=total)
        dev = self.device
        n_dec = len(decode)
        context_lens = starts + lens
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            num_decode_tokens=n_dec,
            decode_block_tables=torch.from_numpy(table_array[:n_dec]).to(dev),
            decode_context_lens=torch.from_numpy(context_lens[:n_dec]).to(dev),
            decode_max_context=int(context_lens[:n_dec].max()) if n_dec else 0,
            prefill_query_starts=offsets[n_dec:-1].tolist(),
            prefill_query_lens=lens[n_dec:].tolist(),
            prefill_context_lens=context_lens[n_dec:].tolist(),
            prefill_block_tables=[
                torch.tensor(tables[j][: -(-int(context_lens[j]) // bs)], dtype=torch.long, device=dev)
                for j in range(n_dec, len(ordered))
            ],
        )
        first_row = np.empty(len(chunks), dtype=np.int64)  # each chunk's first row in the step's tokens
        first_row[order] = offsets[:-1]
        last_token = first_row + np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks)) - 1
        sample_rows = last_token[[i for i, c in enumerate(chunks) if c.sample]]
        return (
            torch.from_numpy(input_ids).to(dev),
            torch.from_numpy(positions).to(dev),
            meta,
            torch.from_numpy(sample_rows).to(dev),
            first_row,
        )
