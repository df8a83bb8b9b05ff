"""Turn the last-position logits of each sampling sequence into next tokens (and log-probabilities).

Order of operations, as in vLLM: log-probabilities are taken from the raw model logits; then penalties,
min_tokens suppression, then greedy argmax or temperature / top-k / top-p / min-p sampling. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which needs no host sync per row, and a per-sequence
generator for seeded requests, so a seeded request samples the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import xxhash

from nanoserve.engine.sequence import Sequence


@dataclass(slots=True)
class SampledLogprobs:
    token_logprob: float
    token_rank: int  # 1 = the most likely token
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]


def _seed_for(seed: int, sample_index: int) -> int:
    """The generator seed for sample ``sample_index`` of a request seeded with ``seed`` (any Python int,
    negative or beyond 64 bits): the same pair always gives the same seed, different pairs differ except by
    hash chance. A hash, not arithmetic, because torch's CPU generator keeps only the low 32 bits of its seed:
    with ``seed * c + i`` the seeds ``s`` and ``s + 2**32`` (or ``-1`` and ``2**64 - 1``) shared one stream.
    Every bit of the pair reaches the low 32 bits of the hash. Masked to 63 bits: a valid seed everywhere."""
    # Two's-complement bytes, not str(seed): str raises beyond 4300 digits, and this runs on the engine thread.
    data = seed.to_bytes(seed.bit_length() // 8 + 1, "little", signed=True)
    return xxhash.xxh3_64_intdigest(data, seed=sample_index) & 0x7FFF_FFFF_FFFF_FFFF


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int, device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def forget(self, seq_id: int) -> None:
        self._seq_generators.pop(seq_id, None)

    # The runner returns logits made under inference_mode (inference tensors); penalties and min_tokens
    # masking edit them in place, which torch only allows inside inference_mode too.
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: [N, V], row i belongs to seqs[i]. Rows are modified in place (penalties, masking)."""
        logits = logits.float()
        logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        for i, seq in enumerate(seqs):
            params = seq.params
            if params.has_penalties:
                self._apply_penalties(logits[i], seq)
            if seq.num_output_tokens < params.min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
                # A stop id outside the vocabulary can never be sampled anyway; indexing with it would raise.
                banned = [t for t in banned if t < logits.shape[1]]
                if banned:
                    logits[i, banned] = float("-inf")

        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            rows = (~greedy).nonzero().squeeze(1)
            tokens[rows] = self._sample(logits[rows], [seqs[int(r)] for r in rows])
        token_list = tokens.tolist()

        out_logprobs: list[SampledLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            chosen = torch.tensor([token_list[i] for i in logprob_rows], device=logits.device)
            chosen_lp = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
            ranks = (raw_logprobs > chosen_lp[:, None]).sum(dim=1) + 1
            k_max = max(seqs[i].params.logprobs for i in logprob_rows)
            top_lp, top_ids = raw_logprobs.topk(k_max, dim=-1) if k_max else (None, None)
            for j, i in enumerate(logprob_rows):
                k = seqs[i].params.logprobs
                out_logprobs[i] = SampledLogprobs(
                    token_logprob=float(chosen_lp[j]),
                    token_rank=int(ranks[j]),
                    top_ids=top_ids[j, :k].tolist() if k else [],
                    top_logprobs=top_lp[j, :k].tolist() if k else [],
                )
        return SamplerOutput(token_list, out_logprobs)

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
        """OpenAI/vLLM definitions; ``row`` ([V]) is modified in place."""
        params = seq.params
        vocab = row.shape[0]
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
            seen = seen[seen < vocab]
            values = row[seen]
            row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
            if output.numel():
                counts = torch.bincount(output[output < vocab], minlength=vocab).to(row.dtype)
                row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [N, V] of rows that are not greedy (temperature >= SAMPLING_EPS, so dividing by it is safe)."""
        device = logits.device
        vocab = logits.shape[1]
        # A temperature beyond float32's range would become inf, and -inf / inf (a masked token) is NaN.
        max_temp = torch.finfo(logits.dtype).max
        temps = torch.tensor([min(s.params.temperature, max_temp) for s in seqs], dtype=logits.dtype, device=device)
        logits = logits / temps[:, None]
        # top_k beyond the vocabulary keeps everything (and a bignum must not reach an int64 tensor).
        top_k = [min(s.params.top_k, vocab) if s.params.top_k > 0 else vocab for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=device)[None, :]
            k = torch.tensor(top_k, device=device)
            sorted_logits.masked_fill_(ranks >= k[:, None], float("-inf"))
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens strictly before it already reach top_p. The most likely token always
            # stays, however small top_p is, so a row never loses every token.
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            p = torch.tensor(top_p, device=device)
            drop = before >= p[:, None]
            drop[:, 0] = False
            sorted_logits.masked_fill_(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=device)
        if bool((min_p > 0).any()):
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._generator_for(seq))
        return (probs / noise).argmax(dim=-1)

    def _generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        gen = self._seq_generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(self.device).manual_seed(_seed_for(seq.params.seed, seq.sample_index))
            self._seq_generators[seq.seq_id] = gen
        return gen
