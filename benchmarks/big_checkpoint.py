"""Write a random-weight Hugging Face checkpoint of a real model's shape, without building the model.

``nanoserve.testing.checkpoints.build_checkpoint`` builds the transformers model and calls
``save_pretrained``: fine for tiny models, impossible for an 8B one on a 24 GB host (fp32 init alone is
33 GB). Here the tensors are generated one at a time from the config and written shard by shard, so peak
memory is about one shard (``--max-shard-size``, default 4 GB) whatever the model's size.

The files are what the test checkpoints hold (same config conventions, tokenizer, generation_config), laid
out as a hub checkpoint is: ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, with the
exact tensor names of ``Qwen3ForCausalLM`` (``Qwen3MoeForCausalLM`` for ``qwen3-30b-a3b``: one tensor per expert
and projection, as the hub ships it). Before writing, the planned names and shapes are checked against the
transformers model built on the meta device (no memory), so they cannot drift from transformers (transformers 5
holds a layer's experts stacked, ``mlp.experts.gate_up_proj`` [E, 2 I, H]: the per-expert names are stacked for
the comparison).

The weights are random (projections std 0.02, residual-branch outputs scaled down by sqrt(2 * layers) so
the residual stream stays small in bf16; norms ~1): the checkpoint loads, generates and can be timed, but
its text is noise.

``--quantize int4`` writes compressed-tensors ``pack-quantized`` tensors directly, as llmcompressor's W4A16
scheme saves them (symmetric, group 128): every Linear of ``model.layers`` but the MoE routers becomes
``weight_packed`` (int32 words of random 4-bit codes, 1..15 so the weights are centred on 0), ``weight_scale``
(bf16, sized so the dequantized weight has the float checkpoint's std) and ``weight_shape``; embeddings, norms,
routers and the LM head stay bf16, and ``config.json`` carries the ``quantization_config`` (ignore ``lm_head`` and
``re:.*mlp.gate$``). No float weight of a quantized layer is ever made.

    python benchmarks/big_checkpoint.py OUT_DIR --shape qwen3-8b              # ~16.4 GB, 5 shards
    python benchmarks/big_checkpoint.py OUT_DIR --shape qwen3-0.6b --layers 2 # quick test
    python benchmarks/big_checkpoint.py OUT_DIR --shape qwen3-30b-a3b --quantize int4   # ~16.7 GB, 5 shards
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Real shapes (the published config.json of each model). Qwen3-0.6B ties its embeddings; Qwen3-8B does not.
# Qwen3-30B-A3B: every layer sparse, 128 experts 768 wide, top 8 renormalised (intermediate_size is unused).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        arch="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        moe=dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[]),
    ),
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

# --quantize int4: compressed-tensors W4A16, symmetric, group 128 (llmcompressor's preset).
GROUP_SIZE = 128
# Random codes uniform in 1..15 (signed -7..7 around the implied zero point 8): their standard deviation, which a
# scale divides a weight's std by. (0..15 would bias every weight by half a step.)
CODE_STD = math.sqrt((15**2 - 1) / 12)
SCALE_JITTER = 0.2  # each group's scale is its tensor's times U(1 - j, 1 + j)
# The Linear weights llmcompressor quantizes (targets "Linear"), minus its ignore list (lm_head, the routers).
QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$"
)
# Byte v (0..224) of a random draw -> codes v % 15 + 1 (low nibble) and v // 15 + 1 (high nibble): low nibble
# first, so the int32 words (little-endian) hold their 8 values LSB first, as compressed-tensors packs them.
_CODE_PAIRS = torch.tensor([(v % 15 + 1) | ((v // 15 + 1) << 4) for v in range(225)], dtype=torch.uint8)
COMPRESSED_TENSORS_VERSION = "0.20.1"  # what the config claims: the library this layout was checked against
_DTYPES = {"float": DTYPE, "packed": torch.int32, "scale": DTYPE, "shape": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write. ``kind``: ``float`` (bf16 ~ N(mean, std)), or a quantized Linear's ``packed`` (int32
    words of random 4-bit codes), ``scale`` (bf16 around ``mean``) or ``shape`` (int64 ``[N, K]``, in ``mean``
    and ``std``)."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    kind: str = "float"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.kind]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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
    arch = kwargs.pop("arch", "qwen3")
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    # build_tokenizer gives <|endoftext|> id 0 (its contract), so the config needs no tokenizer to be built.
    return _make_config(arch, rope_scaling=None, torch_dtype="bfloat16", eos_id=0, **kwargs)


def is_sparse(config: Any, layer: int) -> bool:
    """Whether layer ``layer`` holds experts (transformers' ``Qwen3MoeDecoderLayer`` rule); dense models never."""
    if getattr(config, "num_experts", 0) <= 0:
        return False
    return layer not in (config.mlp_only_layers or []) and (layer + 1) % config.decoder_sparse_step == 0


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
        ]
        if is_sparse(config, i):  # the router, then one gate / up / down per expert (the hub's layout)
            e_inter = config.moe_intermediate_size
            specs.append(TensorSpec(p + "mlp.gate.weight", (config.num_experts, h), 0.0, PROJ_STD))
            for e in range(config.num_experts):
                specs += [
                    TensorSpec(p + f"mlp.experts.{e}.gate_proj.weight", (e_inter, h), 0.0, PROJ_STD),
                    TensorSpec(p + f"mlp.experts.{e}.up_proj.weight", (e_inter, h), 0.0, PROJ_STD),
                    TensorSpec(p + f"mlp.experts.{e}.down_proj.weight", (h, e_inter), 0.0, out_std),
                ]
        else:
            specs += [
                TensorSpec(p + "mlp.gate_proj.weight", (inter, h), 0.0, PROJ_STD),
                TensorSpec(p + "mlp.up_proj.weight", (inter, h), 0.0, PROJ_STD),
                TensorSpec(p + "mlp.down_proj.weight", (h, inter), 0.0, out_std),
            ]
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), 1.0, NORM_STD),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), 1.0, NORM_STD),
        ]
    specs.append(TensorSpec("model.norm.weight", (h,), 1.0, NORM_STD))
    if not config.tie_word_embeddings:  # a tied head is the embedding; save_pretrained does not write it
        specs.append(TensorSpec("lm_head.weight", (vocab, h), 0.0, PROJ_STD))
    return specs


_EXPERT = re.compile(r"^(?P<layer>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def stacked_names(specs: list[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``specs`` as transformers 5 holds them in memory: each layer's per-expert tensors as
    ``mlp.experts.gate_up_proj`` [E, 2 I, H] and ``mlp.experts.down_proj`` [E, H, I] (every expert present,
    all of one shape); the other tensors as they are."""
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {}
    for s in specs:
        if m := _EXPERT.match(s.name):
            experts.setdefault(m["layer"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = s.shape
        else:
            out[s.name] = s.shape
    for layer, by_expert in experts.items():
        first = by_expert[0]
        if sorted(by_expert) != list(range(len(by_expert))) or any(v != first for v in by_expert.values()):
            raise RuntimeError(f"{layer}: experts missing or of different shapes")
        (i, h), down = first["gate"], first["down"]
        if first["up"] != (i, h) or down != (h, i):
            raise RuntimeError(f"{layer}: expert projections of inconsistent shapes {first}")
        out[f"{layer}.gate_up_proj"] = (len(by_expert), 2 * i, h)
        out[f"{layer}.down_proj"] = (len(by_expert), h, i)
    return out


def check_against_transformers(config: Any, specs: list[TensorSpec]) -> None:
    """Raise unless ``specs`` has exactly the names and shapes of the transformers model's state dict
    (``Qwen3ForCausalLM`` or ``Qwen3MoeForCausalLM``; per-expert tensors compared stacked, see
    :func:`stacked_names`).

    Built on the meta device: no memory and no init cost, so the full-size model is checked, not a proxy."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = (Qwen3MoeForCausalLM if config.model_type == "qwen3_moe" else Qwen3ForCausalLM)(config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    ours = stacked_names(specs)
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))[:5]
        extra = sorted(set(ours) - set(theirs))[:5]
        shapes = [(k, ours[k], theirs[k]) for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]][:5]
        raise RuntimeError(f"tensor plan differs from {type(model).__name__}: missing {missing}, extra {extra}, "
                           f"shape (ours, theirs) {shapes}")  # fmt: skip


def quantized_specs(specs: list[TensorSpec]) -> list[TensorSpec]:
    """``specs`` with every :data:`QUANTIZED` weight ``[N, K]`` replaced by its compressed-tensors tensors:
    ``weight_packed`` int32 [N, K / 8], ``weight_scale`` bf16 [N, K / 128] (about std / :data:`CODE_STD`, so the
    dequantized weight keeps the float weight's std) and ``weight_shape`` int64 [2]."""
    out = []
    for s in specs:
        if not QUANTIZED.match(s.name):
            out.append(s)
            continue
        n, k = s.shape
        if k % GROUP_SIZE:
            raise RuntimeError(f"{s.name}: input size {k} is not a multiple of the group size {GROUP_SIZE}")
        module = s.name.removesuffix(".weight")
        out += [
            TensorSpec(f"{module}.weight_packed", (n, k * 4 // 32), 0.0, 0.0, "packed"),
            TensorSpec(f"{module}.weight_scale", (n, k // GROUP_SIZE), s.std / CODE_STD, 0.0, "scale"),
            TensorSpec(f"{module}.weight_shape", (2,), float(n), float(k), "shape"),
        ]
    return out


def quantization_config(specs: list[TensorSpec]) -> dict[str, Any]:
    """The ``quantization_config`` llmcompressor writes for W4A16 (symmetric, group 128, pack-quantized), key for
    key as ``tests/quant_packers.py`` (checked against compressed-tensors 0.20.1) has it; ``ignore``: the LM head
    and, for a mixture of experts, the routers by regex, as llmcompressor's MoE examples do."""
    routers = any(s.name.endswith(".mlp.gate.weight") for s in specs)
    weights = {
        "actorder": None, "block_structure": None, "dynamic": False, "group_size": GROUP_SIZE, "num_bits": 4,
        "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int",
    }  # fmt: skip
    group = {"format": "pack-quantized", "input_activations": None, "output_activations": None,
             "targets": ["Linear"], "weights": weights}  # fmt: skip
    return {
        "config_groups": {"group_0": group}, "format": "pack-quantized", "global_compression_ratio": None,
        "ignore": ["lm_head", *(["re:.*mlp.gate$"] if routers else [])], "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": COMPRESSED_TENSORS_VERSION,
    }  # fmt: skip


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
    if spec.kind == "float":
        return torch.empty(spec.shape, dtype=DTYPE).normal_(spec.mean, spec.std, generator=gen)
    if spec.kind == "packed":
        n, words = spec.shape
        # One draw per byte: v in 0..224 is two independent codes 1..15, looked up (uint8 division is slow).
        v = torch.randint(0, 225, (n, words * 4), generator=gen, dtype=torch.uint8)
        # Looked up 256 rows at a time: one int64 index tensor 8x the packed size per call fragmented the heap
        # (a 4 GB shard's generation passed 24 GiB of RSS, measured), small ones are reused.
        packed = torch.empty_like(v)
        for r in range(0, n, 256):
            packed[r : r + 256] = torch.take(_CODE_PAIRS, v[r : r + 256].long())
        return packed.view(torch.int32)
    if spec.kind == "scale":
        jitter = torch.empty(spec.shape, dtype=torch.float32).uniform_(1 - SCALE_JITTER, 1 + SCALE_JITTER, generator=gen)
        return (jitter * spec.mean).to(DTYPE)
    if spec.kind == "shape":
        return torch.tensor([int(spec.mean), int(spec.std)], dtype=torch.int64)
    raise ValueError(f"unknown tensor kind {spec.kind!r}")


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


def write_checkpoint(
    out: Path, shape: str, layers: int | None, max_shard_bytes: int, seed: int, quantize: str | None = None
) -> dict[str, Any]:
    """Write the checkpoint into ``out`` (``quantize`` "int4": compressed-tensors W4A16 tensors); returns a
    summary (bytes, shards, seconds, peak RSS)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    config = make_config(shape, layers)
    specs = tensor_specs(config)
    check_against_transformers(config, specs)  # the float names; the quantized ones are derived from them
    num_parameters = sum(math.prod(s.shape) for s in specs)  # the model's, before any packing
    if quantize == "int4":
        specs = quantized_specs(specs)
    shards = plan_shards(specs, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if quantize == "int4":
        config_json = json.loads((out / "config.json").read_text())
        config_json["quantization_config"] = quantization_config(specs)
        (out / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
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
            "metadata": {"total_parameters": num_parameters, "total_size": total_size},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    on_disk = sum((out / f).stat().st_size for f in names)
    return {
        "out": str(out), "shape": shape, "quantize": quantize, "num_hidden_layers": config.num_hidden_layers,
        "num_tensors": len(specs),
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
    parser.add_argument(
        "--quantize", choices=["int4"], default=None,
        help="write compressed-tensors W4A16 tensors (symmetric, group 128) for every Linear of model.layers but "
        "the MoE routers; embeddings and the LM head stay bf16",
    )  # fmt: skip
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    summary = write_checkpoint(args.out, args.shape, args.layers, int(args.max_shard_size), args.seed, args.quantize)
    print(f"wrote {summary['total_bytes_written'] / 1e9:.2f} GB ({summary['num_shards']} shard(s), "
          f"{summary['num_tensors']} tensors) to {args.out} in {summary['seconds']} s; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
