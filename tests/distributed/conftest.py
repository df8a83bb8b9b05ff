"""Fixtures for tensor-parallel tests: tiny checkpoints and prompts whose greedy reference has no near-ties
(a near-tie may legitimately flip when a TP all-reduce sums partial products in another order)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nanoserve.testing.checkpoints import DEFAULT_ARCH_CONFIGS, build_checkpoint


@pytest.fixture(scope="session")
def tp_checkpoints(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tp-ckpts")
    built: dict[str, Path] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = build_checkpoint(root / name, **DEFAULT_ARCH_CONFIGS[name])
        return str(built[name])

    return get


def make_prompts(count: int, seed: int, low: int = 3, high: int = 40, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(low, high))] for _ in range(count)]
