"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.layers.linear import PackedWeight, ShardRegion, pack_weight, packed_linear


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * shard, (r+1) * shard) of the (padded) vocabulary; lookups outside the slice give
    zeros and the all-reduce fills them in from the owning rank."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.shard_size = -(-vocab_size // tp.size)  # pad so every rank holds the same count
        self.vocab_start = tp.rank * self.shard_size
        # Rows of the shard that hold real tokens (the last rank's tail is padding; a rank may hold none).
        self.num_real_rows = max(0, min(self.shard_size, vocab_size - self.vocab_start))
        self.compute_dtype = dtype  # what lookups return, whatever the table is stored in
        # torch.empty, not zeros: a table nobody fills (an LM head that is quantized as it loads, an embedding
        # re-made in its stored half type) then never touches its pages. Only the padding rows past the
        # vocabulary must read as zeros.
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self._zero_padding()
        self.weight.weight_loader = self.weight_loader

    def _zero_padding(self) -> None:
        if self.num_real_rows < self.shard_size:
            self.weight.data[self.num_real_rows :].zero_()

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        from nanoserve.layers.linear import check_shape

        check_shape(loaded, (self.vocab_size, param.shape[1]))
        if self.num_real_rows:
            param.data[: self.num_real_rows].copy_(loaded[self.vocab_start : self.vocab_start + self.num_real_rows])

    def store_as(self, dtype: torch.dtype) -> None:
        """Hold the table in ``dtype`` (the checkpoint's half type, beside low-bit projections: a lookup reads
        one row per token, so it costs no speed, and the table keeps its stored size); rows are widened to the
        compute dtype as they are looked up. Call before loading."""
        self.weight.data = torch.empty(tuple(self.weight.shape), dtype=dtype)
        self._zero_padding()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight).to(self.compute_dtype)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight).to(self.compute_dtype)
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary slice, gathered to full width on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__(vocab_size, hidden_size, dtype, tp)
        self.packed_weight: PackedWeight | None = None
        self.quant: Any = None  # a quantization.linear.QuantizedWeight once use_quantized() is called
        self.tied = False

    def shard_region(self, shard_id: Any = None) -> ShardRegion:
        return ShardRegion(0, self.vocab_start, self.num_real_rows, 0, (self.vocab_size, self.weight.shape[1]))

    def use_quantized(self, quant: Any) -> None:
        """Compute the logits from low-bit codes. Untied, the float weight is never filled: the checkpoint's
        ``lm_head.weight`` is quantized as it is read. Tied, the embedding's weight stays (lookups read it) and
        is quantized into the codes after loading (:meth:`finish_loading`)."""
        self.region = self.shard_region()
        if not self.tied:
            del self.weight
        self.quant = quant
        self.packed = nn.Parameter(quant.allocate(), requires_grad=False)

    def load_checkpoint_tensor(self, suffix: str, loaded: Any, shard_id: Any = None, checkpoint_name: str | None = None) -> None:
        self.quant.load(self.packed.data, suffix, loaded, self.region, shard_id, checkpoint_name)

    def finish_loading(self) -> None:
        if self.tied:
            own_rows = ShardRegion(0, 0, self.region.size, 0, (self.region.size, self.weight.shape[1]))
            self.quant.load(self.packed.data, "weight", self.weight.data[: self.region.size], own_rows, None, "lm_head")

    def pack_for_cpu(self, release_dense: bool) -> bool:
        """Use a packed copy of the weight for the logits (see ``linear.pack_weight``). With tied embeddings
        the dense weight stays (the embedding lookup reads it), so the packed copy costs its size again."""
        if self.quant is not None:
            return False
        packed = pack_weight(self.weight)
        if packed is None:
            return False
        self.packed_weight = packed
        if release_dense:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)
        return True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [N, H] -> logits [N, V]
        if self.quant is not None:
            logits = self.quant.matmul(hidden, self.packed.data, None)
        elif self.packed_weight is not None:
            logits = packed_linear(hidden, self.packed_weight, None)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]
