"""Shared fixtures: tiny random-weight checkpoints, transformers reference outputs, prompt helpers.

Everything expensive is built lazily and cached for the whole session: a checkpoint is only written when a
test first asks for it, and a transformers continuation is only computed once per
(checkpoint, prompt, max_tokens).
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

# Every engine step in the test session re-checks block and request accounting (LLMEngine reads this in its
# constructor). Set at import time so engines built by any fixture or test see it.
os.environ["NANOSERVE_CHECK_INVARIANTS"] = "1"

import torch  # noqa: E402

# The test models are tiny (hidden <= 128): a second intra-op thread buys nothing, and on a busy 2-core CI box
# OpenMP threads spin-waiting for each other made a forward pass ~10x slower (measured: 3600 small linears went
# from ~0.1 s to 35 s under load). Set NANOSERVE_TEST_THREADS to override.
torch.set_num_threads(int(os.environ.get("NANOSERVE_TEST_THREADS", "1")))

from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_arch_checkpoint  # noqa: E402
from nanoserve.testing.reference import ReferenceOutput, hf_greedy, load_hf_model  # noqa: E402

# Ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>: test prompts use plain tokens only.
FIRST_PLAIN_TOKEN = 3


@dataclass
class CheckpointCache:
    """Builds ``DEFAULT_ARCH_CONFIGS[name]`` under ``root`` on first use, then returns the same directory."""

    root: pathlib.Path
    _paths: dict[str, pathlib.Path] = field(default_factory=dict)

    def __call__(self, name: str) -> pathlib.Path:
        if name not in self._paths:
            self._paths[name] = build_arch_checkpoint(name, self.root)
        return self._paths[name]


@dataclass
class ReferenceCache:
    """transformers greedy continuations (EOS ignored), cached per (checkpoint, prompt, max_tokens).

    A longer cached continuation of the same prompt also answers a shorter request (greedy is a prefix).
    """

    checkpoints: CheckpointCache
    _models: dict[str, Any] = field(default_factory=dict)
    _outputs: dict[tuple[str, tuple[int, ...]], ReferenceOutput] = field(default_factory=dict)

    def __call__(self, name: str, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[ReferenceOutput]:
        missing = [
            list(p) for p in dict.fromkeys(tuple(p) for p in prompts)
            if len(self._outputs.get((name, p), ReferenceOutput([], [], [])).token_ids) < max_tokens
        ]  # fmt: skip
        if missing:
            if name not in self._models:
                self._models[name] = load_hf_model(self.checkpoints(name))
            for prompt, out in zip(missing, hf_greedy(None, missing, max_tokens, model=self._models[name])):
                self._outputs[(name, tuple(prompt))] = out
        results = []
        for p in prompts:
            full = self._outputs[(name, tuple(p))]
            results.append(
                ReferenceOutput(full.token_ids[:max_tokens], full.logprobs[:max_tokens], full.top2_gaps[:max_tokens])
            )
        return results

    def model(self, name: str) -> Any:
        """The loaded transformers model (eager attention, fp32), for tests that need more than greedy."""
        if name not in self._models:
            self._models[name] = load_hf_model(self.checkpoints(name))
        return self._models[name]


def make_prompts(
    vocab_size: int, n: int, *, seed: int, min_len: int = 1, max_len: int = 40
) -> list[list[int]]:
    """``n`` prompts of plain random token ids with lengths spread over ``[min_len, max_len]``.

    Lengths are spread evenly (then shuffled) rather than drawn, so a batch always mixes short and long.
    """
    rng = random.Random(seed)
    if n == 1:
        lengths = [rng.randint(min_len, max_len)]
    else:
        lengths = [min_len + (max_len - min_len) * i // (n - 1) for i in range(n)]
        rng.shuffle(lengths)
    return [[rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(length)] for length in lengths]


def vocab_size_of(name: str) -> int:
    return int(DEFAULT_ARCH_CONFIGS[name].get("vocab_size", 512))


def token_prompts(prompts: Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """Token-id prompts in the ``{"prompt_token_ids": [...]}`` form ``LLM.generate`` takes."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


def assert_all_blocks_free(engine: Any) -> None:
    """After a generate() every block must be back in the free queue and the accounting consistent."""
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks still held"
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_integrity()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointCache:
    """``checkpoint(name) -> path`` of ``DEFAULT_ARCH_CONFIGS[name]``, built once per session."""
    return CheckpointCache(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def hf_reference(checkpoint: CheckpointCache) -> ReferenceCache:
    """``hf_reference(name, prompts, max_tokens) -> [ReferenceOutput]``: transformers' greedy tokens."""
    return ReferenceCache(checkpoint)


@pytest.fixture(scope="session")
def prompt_maker() -> Callable[..., list[list[int]]]:
    """``prompt_maker(vocab_size, n, seed=..., min_len=..., max_len=...)``: see :func:`make_prompts`."""
    return make_prompts
