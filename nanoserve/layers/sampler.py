"""Turn the last-position logits of each sampling sequence into next tokens (and log-probabilities).

Order of operations, as in vLLM: log-probabilities are taken from the raw model logits; then penalties,
min_tokens suppression, then greedy argmax or temperature / top-k / top-p / min-p sampling. Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which needs no host sync per row, and a per-sequence
generator for seeded requests, so a seeded request samples the same tokens alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    # Distinct, reproducible streams for the n samples of one seeded request.
    return (seed * 1_000_003 + sample_index) & 0x7FFF_FFFF_FFFF_FFFF


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
                if banned:
                    logits[i, banned] = float("-inf")

        greedy = torch.tensor([s.params.temperature == 0 or s.params.top_k == 1 for s in seqs], device=logits.device)
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
        device = logits.device
        temps = torch.tensor([s.params.temperature for s in seqs], device=device)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(logits.shape[1], device=device)[None, :]
            k = torch.tensor([k if k > 0 else logits.shape[1] for k in top_k], device=device)
            sorted_logits.masked_fill_(ranks >= k[:, None], float("-inf"))
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens strictly before it already reach top_p (the first always stays).
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            p = torch.tensor(top_p, device=device)
            sorted_logits.masked_fill_(before >= p[:, None], float("-inf"))
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
