"""The built-in demo checkpoint: a small Qwen3 with seeded random weights, so nanoserve runs offline.

Its output is fluent-looking nonsense, but it exercises the whole engine (real architecture, real
tokenizer with a chat template, tied embeddings, head_dim != hidden/heads) with nothing downloaded.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Any

DEMO_MODEL_NAME = "nanoserve-demo-qwen3"

# Bump the suffix whenever DEMO_CONFIG or the checkpoint builder changes what gets written, so
# stale caches are never reused.
_DEMO_DIR_NAME = "demo-qwen3-v1"

DEMO_CONFIG: dict[str, Any] = dict(
    arch="qwen3",
    vocab_size=4096,  # big enough that the BPE learns real sub-words
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,  # q/o projections are 512 wide, like real Qwen3 (head_dim * heads != hidden)
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    seed=0,
)


def _cache_root(cache_dir: str | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("NANOSERVE_CACHE_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "nanoserve"


def demo_model_path(cache_dir: str | None = None) -> str:
    """Path of the demo checkpoint, building it on first use (deterministic, a few seconds).

    Lives at ``<root>/demo-qwen3-v1`` where root is ``cache_dir``, else ``$NANOSERVE_CACHE_DIR``,
    else ``~/.cache/nanoserve``. The checkpoint is written to a temporary directory beside it and
    renamed into place, so the final directory is either absent or complete, and concurrent
    callers all end up with the same directory (the loser of the rename discards its copy).
    """
    root = _cache_root(cache_dir)
    final = root / _DEMO_DIR_NAME
    if (final / "config.json").is_file():
        return str(final)

    # Imported here so `import nanoserve.tools.demo` stays cheap when the cache is warm.
    from nanoserve.testing.checkpoints import build_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{_DEMO_DIR_NAME}.tmp-{os.getpid()}-", dir=root))
    try:
        build_checkpoint(tmp, **DEMO_CONFIG)
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if `final` now exists
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process won the race; its checkpoint is identical to ours.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
