"""Write a random-weight Hugging Face checkpoint of a real model's shape, without building the model.

``nanoserve.testing.checkpoints.build_checkpoint`` builds the transformers model and calls
``save_pretrained``: fine for tiny models, impossible for an 8B one on a 24 GB host (fp32 init alone is
33 GB). Here the tensors are generated one at a time from the config and written shard by shard, so peak
memory is about one shard (``--max-shard-size``, default 4 GB) whatever the model's size.

The files are what the test checkpoints hold (same config conventions, tokenizer, generation_config), laid
out as a hub checkpoint is: ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, with the
exact tensor names of ``Qwen3ForCausalLM``. Before writing, the planned names and shapes are checked against
``Qwen3ForCausalLM(config)`` built on the meta device (no memory), so they cannot drift from transformers.

The weights are random (projections std 0.02, residual-branch outputs scaled down by sqrt(2 * layers) so
the residual stream stays small in bf16; norms ~1): the checkpoint loads, generates and can be timed, but
its text is noise.

    python benchmarks/big_checkpoint.py OUT_DIR --shape qwen3-8b              # ~16.4 GB, 5 shards
    python benchmarks/big_checkpoint.py OUT_DIR --shape qwen3-0.6b --layers 2 # quick test
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Real shapes (the published config.json of each model). Qwen3-0.6B ties its embeddings; Qwen3-8B does not.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-8b": dict(
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
    ),
}  # fmt: skip

PROJ_STD = 0.02  # HF's initializer_range: q/k/v, gate/up, embeddings, lm_head
NORM_STD = 0.02  # norm weights ~ N(1, NORM_STD)
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    mean: float
    std: float

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE.itemsize


def peak_rss_bytes() -> int:
    """VmHWM: this process's peak resident set since exec (``ru_maxrss`` can carry a parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def make_config(shape: str, layers: int | None) -> Any:
    """The Qwen3Config of ``shape``, built the way the test checkpoints build theirs (rope_parameters,
    Qwen-style bos = eos = pad = <|endoftext|>, ``architectures``), in bfloat16."""
    from nanoserve.testing.checkpoints import _make_config

    kwargs = dict(SHAPES[shape])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    # build_tokenizer gives <|endoftext|> id 0 (its contract), so the config needs no tokenizer to be built.
    return _make_config("qwen3", rope_scaling=None, torch_dtype="bfloat16", eos_id=0, **kwargs)


def tensor_specs(config: Any) -> list[TensorSpec]:
    """Every tensor ``save_pretrained`` would write for ``Qwen3ForCausalLM(config)``, in state_dict order."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    # o_proj and down_proj add into the residual stream, once each per layer: GPT-2's scaling keeps the sum
    # of 2 * layers branch outputs about as large as one unscaled branch.
    out_std = PROJ_STD / math.sqrt(2 * config.num_hidden_layers)
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), 0.0, PROJ_STD)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "self_attn.q_proj.weight", (q_out, h), 0.0, PROJ_STD),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_out, h), 0.0, PROJ_STD),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_out, h), 0.0, PROJ_STD),
            TensorSpec(p + "self_attn.o_proj.weight", (h, q_out), 0.0, out_std),
            TensorSpec(p + "self_attn.q_norm.weight", (config.head_dim,), 1.0, NORM_STD),
            TensorSpec(p + "self_attn.k_norm.weight", (config.head_dim,), 1.0, NORM_STD),
            TensorSpec(p + "mlp.gate_proj.weight", (inter, h), 0.0, PROJ_STD),
            TensorSpec(p + "mlp.up_proj.weight", (inter, h), 0.0, PROJ_STD),
            TensorSpec(p + "mlp.down_proj.weight", (h, inter), 0.0, out_std),
            TensorSpec(p + "input_layernorm.weight", (h,), 1.0, NORM_STD),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), 1.0, NORM_STD),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), 1.0, NORM_STD))
    if not config.tie_word_embeddings:  # a tied head is the embedding; save_pretrained does not write it
        specs.append(TensorSpec("lm_head.weight", (vocab, h), 0.0, PROJ_STD))
    return specs


def check_against_transformers(config: Any, specs: list[TensorSpec]) -> None:
    """Raise unless ``specs`` has exactly the names and shapes of ``Qwen3ForCausalLM(config)``'s state dict.

    Built on the meta device: no memory and no init cost, so the full-size model is checked, not a proxy."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    ours = {s.name: s.shape for s in specs}
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))[:5]
        extra = sorted(set(ours) - set(theirs))[:5]
        shapes = [(k, ours[k], theirs[k]) for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]][:5]
        raise RuntimeError(f"tensor plan differs from Qwen3ForCausalLM: missing {missing}, extra {extra}, "
                           f"shape (ours, theirs) {shapes}")  # fmt: skip


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own), as HF's
    ``split_torch_state_dict_into_shards`` does for a state dict in order."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """``spec``'s tensor from its own seeded generator: the same values whatever the layer count or sharding."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return torch.empty(spec.shape, dtype=DTYPE).normal_(spec.mean, spec.std, generator=gen)


def write_tokenizer_files(out: Path, config: Any) -> None:
    """tokenizer.json / tokenizer_config.json and generation_config.json, as ``build_checkpoint`` writes them."""
    from transformers import GenerationConfig

    from nanoserve.testing.checkpoints import EOS_TOKEN, IM_END_TOKEN, _patch_tokenizer_config, build_tokenizer

    tokenizer = build_tokenizer(config.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    if eos_id != config.eos_token_id:
        raise RuntimeError(f"tokenizer eos id {eos_id} != config eos_token_id {config.eos_token_id}")
    tokenizer.save_pretrained(out)
    _patch_tokenizer_config(out / "tokenizer_config.json", config.max_position_embeddings)
    # Real chat checkpoints stop on either end-of-text or end-of-turn.
    GenerationConfig(bos_token_id=eos_id, eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id).save_pretrained(out)


def write_checkpoint(out: Path, shape: str, layers: int | None, max_shard_bytes: int, seed: int) -> dict[str, Any]:
    """Write the checkpoint into ``out``; returns a summary (bytes, shards, seconds, peak RSS)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    config = make_config(shape, layers)
    specs = tensor_specs(config)
    check_against_transformers(config, specs)
    shards = plan_shards(specs, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    write_tokenizer_files(out, config)

    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    weight_map: dict[str, str] = {}
    for filename, shard in zip(names, shards):
        ts = time.perf_counter()
        # One shard's tensors only: peak memory ~ the largest shard. save_file writes from the tensors'
        # own memory (no byte copies), so it adds nothing on top.
        tensors = {spec.name: random_tensor(spec, seed) for spec in shard}
        save_file(tensors, out / filename, metadata={"format": "pt"})
        del tensors
        weight_map.update({spec.name: filename for spec in shard})
        size = sum(s.nbytes for s in shard)
        print(f"  {filename}: {len(shard)} tensors, {size / 1e9:.2f} GB, {time.perf_counter() - ts:.1f} s", flush=True)
    total_size = sum(s.nbytes for s in specs)
    if n > 1:
        index = {
            "metadata": {"total_parameters": sum(math.prod(s.shape) for s in specs), "total_size": total_size},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    on_disk = sum((out / f).stat().st_size for f in names)
    return {
        "out": str(out), "shape": shape, "num_hidden_layers": config.num_hidden_layers, "num_tensors": len(specs),
        "num_shards": n, "tensor_bytes": total_size, "safetensors_bytes_on_disk": on_disk,
        "total_bytes_written": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        "largest_tensor_bytes": max(s.nbytes for s in specs), "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output directory (created)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick tests)")
    parser.add_argument("--max-shard-size", type=float, default=4e9, help="bytes per shard at most (default 4e9)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    summary = write_checkpoint(args.out, args.shape, args.layers, int(args.max_shard_size), args.seed)
    print(f"wrote {summary['total_bytes_written'] / 1e9:.2f} GB ({summary['num_shards']} shard(s), "
          f"{summary['num_tensors']} tensors) to {args.out} in {summary['seconds']} s; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
