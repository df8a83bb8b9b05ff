"""What structured outputs cost per engine step: 32 running requests all under a JSON schema, against the same 32
unconstrained, on the Qwen3-0.6B shape (vocabulary 151,936), batch decode steps timed one by one.

The schema forces a long output (a string of at least 4,000 characters), so every constrained request is still
running through the timed steps, as the unconstrained ones are (``ignore_eos``). Also reported: the grammar
compile time of each of a few schemas (cold: a fresh compiler each time; the first also builds llguidance's
view of the tokenizer, reported apart), and where the constrained step's extra time goes (mask fill, mask
apply), measured around the sampler's grammar work.

    python benchmarks/structured_overhead.py [--steps 48] [--cache-dir ~/.cache/nanoserve/bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMAS = {
    "long string": {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000, "maxLength": 8000}},
                    "required": ["text"], "additionalProperties": False},
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
               "age": {"type": "integer", "minimum": 0, "maximum": 150},
               "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 5}},
               "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 8, "items": {
               "type": "object", "properties": {"id": {"type": "integer"}, "price": {"type": "number", "minimum": 0},
               "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}, "required": ["id", "sku"]}}},
               "required": ["items"]},
}  # fmt: skip


def compile_times(tokenizer_path: str, vocab: int) -> tuple[float, dict[str, float]]:
    """(seconds to build llguidance's view of the tokenizer, cold compile seconds per schema)."""
    from nanoserve.engine.llm_engine import load_tokenizer
    from nanoserve.engine.structured_output import GrammarCompiler
    from nanoserve.sampling_params import StructuredOutputsParams

    tokenizer = load_tokenizer(tokenizer_path)
    compiler = GrammarCompiler(tokenizer, vocab, set())
    t = time.perf_counter()
    compiler.prepare()
    tokenizer_s = time.perf_counter() - t
    times = {}
    for name, schema in SCHEMAS.items():
        compiler.clear_cache()  # cold: the grammar is built again
        t = time.perf_counter()
        compiler.matcher(compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True)))
        times[name] = time.perf_counter() - t
    return tokenizer_s, times


def _timed(owner: type, name: str, totals: dict[str, float], key: str, static: bool = False):
    """Wrap ``owner.name`` to add its wall time to ``totals[key]``; returns the function that undoes it."""
    original = owner.__dict__[name]
    fn = original.__func__ if static else original

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t

    setattr(owner, name, staticmethod(timed) if static else timed)
    return lambda: setattr(owner, name, original)


def step_times(model: str, constrained: bool, steps: int, rows: int) -> tuple[list[float], dict[str, float]]:
    """Wall time of each of ``steps`` engine steps with ``rows`` sequences decoding (after their prefill), and
    the sampler's grammar work in them."""
    from nanoserve.config import EngineConfig
    from nanoserve.engine.llm_engine import LLMEngine
    from nanoserve.engine.structured_output import GrammarMatcher
    from nanoserve.layers.sampler import Sampler
    from nanoserve.sampling_params import SamplingParams, StructuredOutputsParams

    config = EngineConfig.create(model, max_model_len=1024, kv_cache_memory="2GiB", enable_prefix_caching=False)
    engine = LLMEngine(config)
    engine.grammars.prepare()  # before the timed steps, as a server does at start-up
    spec = StructuredOutputsParams(json=SCHEMAS["long string"], disable_any_whitespace=True) if constrained else None
    for i in range(rows):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 8, ignore_eos=True, structured_outputs=spec)
        engine.add_request(f"r{i}", [100 + i, 200 + i, 300 + i, 400 + i], params)
    grammar_s = {"sampler": 0.0, "fill": 0.0, "advance": 0.0}
    patches = []
    if constrained:  # time the grammar work where it happens: the sampler (mask fill + apply), the matchers
        patches = [_timed(Sampler, "_apply_grammars", grammar_s, "sampler", static=True),
                   _timed(GrammarMatcher, "fill_bitmask", grammar_s, "fill"),
                   _timed(GrammarMatcher, "accept", grammar_s, "advance")]  # fmt: skip
    engine.step()  # every prefill
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
            assert engine.stats.last_step_running == rows
    finally:
        for undo in patches:
            undo()
        engine.shutdown()
    return times, grammar_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nanoserve/bench"))
    args = parser.parse_args()
    from compare import checkpoint_for  # the same random Qwen3-0.6B-shape checkpoint as the other benchmarks

    model = str(checkpoint_for("qwen3-0.6b", Path(args.cache_dir)))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    tok_s, compiles = compile_times(model, vocab)
    print(f"llguidance tokenizer view (once per tokenizer): {tok_s * 1e3:.0f} ms", flush=True)
    for name, s in compiles.items():
        print(f"compile {name:12s}: {s * 1e3:7.1f} ms")
    free, _ = step_times(model, False, args.steps, args.rows)
    constrained, parts = step_times(model, True, args.steps, args.rows)
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"{args.rows} rows, {args.steps} decode steps each, vocabulary {vocab}")
    print(f"  unconstrained step: median {f * 1e3:.1f} ms")
    print(f"  JSON schema step:   median {c * 1e3:.1f} ms  (+{(c / f - 1) * 100:.1f} %)")
    per_step = {k: v / args.steps * 1e3 for k, v in parts.items()}
    print(f"  grammar work per step: mask fill {per_step['fill']:.2f} ms, mask apply "
          f"{per_step['sampler'] - per_step['fill']:.2f} ms, matcher advance {per_step['advance']:.2f} ms; "
          f"the rest of the difference ({(c - f) * 1e3 - per_step['sampler'] - per_step['advance']:.2f} ms) is "
          "noise and bookkeeping")  # fmt: skip

if __name__ == "__main__":
    main()
