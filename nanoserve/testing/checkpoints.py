"""Deterministic random-weight Hugging Face checkpoints of real architectures, built offline.

Nothing can be downloaded in tests, so every checkpoint nanoserve is tested against is made here:
transformers' own model classes (``Qwen3ForCausalLM``, ``Qwen2ForCausalLM``, ``LlamaForCausalLM``,
the mixture-of-experts ``Qwen3MoeForCausalLM`` and ``MixtralForCausalLM``, ``Phi3ForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` and the vision-language ``Gemma3ForConditionalGeneration`` with a
tiny SigLIP tower) with seeded weights, saved with ``save_pretrained`` exactly as a hub checkpoint would be, next to a
byte-level BPE tokenizer trained on a corpus generated in code.

The same ``(arch, kwargs, seed)`` gives byte-identical files on every run (weights come from a
seeded ``torch.Generator``, the tokenizer from a seeded ``random.Random``), so a checkpoint can be
cached by its arguments.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
from typing import Any

import torch
from torch import nn

MIN_VOCAB_SIZE = 300
"""Smallest vocab ``build_tokenizer`` accepts: 3 special tokens + 256 byte tokens + a few merges."""

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# ChatML, as Qwen checkpoints ship it (minus tool calling). `add_generation_prompt` opens the
# assistant turn so generation continues as the assistant.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SUPPORTED_ARCHS = ("qwen3", "qwen2", "llama", "mistral", "qwen3_moe", "mixtral", "phi3", "gemma2", "gemma3", "gemma3_vl")
MOE_ARCHS = ("qwen3_moe", "mixtral")
GEMMA_ARCHS = ("gemma2", "gemma3", "gemma3_vl")
EXPERT_LAYOUTS = ("per_expert", "stacked")

# Init scales chosen so that greedy decoding of a tiny random model is *not* near-constant: with the
# default std 0.02 every position predicts almost the same token and parity tests see nothing.
# Projections at std 0.2 make attention and MLPs strongly input-dependent; norm weights away from 1
# make a transposed or skipped norm visible; nonzero biases make a dropped bias visible.
LINEAR_STD = 0.2
BIAS_STD = 0.1
EMBED_STD = 0.08
NORM_SPREAD = 0.3
# Qwen3 normalises q and k per head, which caps attention logits near sqrt(head_dim) and leaves a
# tiny model's attention so flat that greedy output falls into short loops; norm weights centred
# at 2.5 instead of 1 sharpen it (measured: >= 14 distinct tokens in 20 greedy steps went from
# ~77% to ~100% of random prompts at hidden 64).
QK_NORM_CENTER = 2.5
# Gemma: tanh soft-capping of scores and logits saturates with the projections above (logits pile up near
# +-cap and greedy steps become near-ties), and its embedding is scaled by sqrt(hidden): smaller projections keep
# scores and logits in tanh's curved but unsaturated range (measured on the fixtures below: see
# tests/model/test_gemma_parity.py, which asserts the reference output varies).
GEMMA_LINEAR_STD = 0.15
GEMMA_EMBED_STD = 0.05

DEFAULT_ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    # GQA with head_dim decoupled from hidden/heads (64/4 = 16), as in real Qwen3 checkpoints.
    "qwen3-gqa": dict(arch="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "qwen3-tied": dict(arch="qwen3", tie_word_embeddings=True, seed=1),
    # Qwen2: qkv bias, MQA (one kv head), a vocab that is not a multiple of anything friendly.
    "qwen2-mqa-bias": dict(arch="qwen2", vocab_size=503, num_attention_heads=4, num_key_value_heads=1, seed=2),
    "llama-gqa": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, seed=3),
    "llama3-rope-scaling": dict(
        arch="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        seed=4,
    ),
    # MHA with a config.json shaped like transformers 4.x wrote it (rope_theta at top level, torch_dtype).
    "llama-mha-v4config": dict(
        arch="llama", num_attention_heads=4, num_key_value_heads=4, config_style="v4", num_hidden_layers=3, seed=5
    ),
    "qwen3-sharded": dict(arch="qwen3", num_shards=2, hidden_size=128, intermediate_size=256, seed=6),
    # Sliding-window attention with a window of 8, far shorter than the test prompts: Mistral v0.1 style (every
    # layer), and Qwen2 style (layers from max_window_layers up slide, layer 0 attends to everything).
    "mistral-window": dict(arch="mistral", extra_config={"sliding_window": 8}, seed=10),
    "qwen2-window": dict(
        arch="qwen2", num_hidden_layers=3, num_key_value_heads=2,
        extra_config={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, seed=11,
    ),  # fmt: skip
    # Mixture of experts: 8 experts, top-2 and top-3, experts 32 wide. Dense and sparse layers mix: layer 1 is
    # dense through mlp_only_layers here, layers 0 and 2 through decoder_sparse_step=2 below; top-k weights
    # renormalised here, not below; one tensor per expert here (the hub's layout), stacked below.
    "qwen3-moe": dict(
        arch="qwen3_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        mlp_only_layers=[1], norm_topk_prob=True, seed=7,
    ),
    "qwen3-moe-step2-stacked": dict(
        arch="qwen3_moe", num_hidden_layers=4, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        decoder_sparse_step=2, norm_topk_prob=False, expert_layout="stacked", seed=8,
    ),
    # Mixtral: every layer sparse, experts intermediate_size wide, always renormalised; w1/w3/w2 names.
    "mixtral": dict(
        arch="mixtral", num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, seed=9,
    ),
    # Phi-3 (fused qkv_proj / gate_up_proj tensors): Phi-3-mini-128k style, MHA, longrope with distinct short and
    # long factors (original length 64 of 256: attention factor sqrt(1 + ln 4 / ln 64)) and a window of 16 on
    # every layer; Phi-4-mini style, GQA, rotary over the first 3/4 of each 64-dim head, tied embeddings.
    "phi3-longrope-window": dict(
        arch="phi3", num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.1, 5.5, 7.0],
                      "long_factor": [1.5, 2.4, 3.9, 6.1, 9.3, 14.0, 20.6, 30.0]},
        extra_config={"original_max_position_embeddings": 64, "sliding_window": 16}, seed=12,
    ),
    "phi4-mini-partial-rotary": dict(
        arch="phi3", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "longrope", "partial_rotary_factor": 0.75,
                      "short_factor": [1.0 + 0.25 * i for i in range(24)], "long_factor": [2.0 + 1.5 * i for i in range(24)]},
        extra_config={"original_max_position_embeddings": 64}, seed=13,
    ),
    # Gemma: local (window 8) and global layers mixed, query_pre_attn_scalar != head_dim, tied embeddings.
    # Gemma 2 soft-caps scores and logits (caps small enough to bend this model's values, unlike 50 / 30 here);
    # Gemma 3 has q/k norms and a rope per layer type (linear scaling on the global layers, as 4B+ ship).
    "gemma2": dict(
        arch="gemma2", num_hidden_layers=3, head_dim=16,
        extra_config={
            "sliding_window": 8, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 4.0,
            "final_logit_softcapping": 6.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
        seed=25,
    ),
    "gemma3": dict(
        arch="gemma3", num_hidden_layers=3, head_dim=16,
        extra_config={
            "sliding_window": 8, "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
        seed=13,
    ),
    # Gemma3ForConditionalGeneration: the gemma3 text model above beside a one-layer SigLIP tower and the
    # projector, tensors named as the hub ships them (language_model.model.*, vision_tower.*, ...).
    "gemma3-vl": dict(
        arch="gemma3_vl", num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, embed_std=0.02,
        extra_config={
            "sliding_window": 8, "query_pre_attn_scalar": 24,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
        seed=14,
    ),
}  # fmt: skip
"""Test matrix: name -> ``build_checkpoint`` kwargs. All tiny (hidden <= 128, layers <= 4)."""


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_WORDS = """
the of and to in is was that for on with as by at from it an be this which or are were have has
had not but all they their there one two three four five ten hundred first new time year people
way day man woman child world life hand part place case week company system program question work
government number night point home water room mother area money story fact month lot right study
book eye job word business issue side kind head house service friend father power hour game line
end member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense nation
plan college interest death experience effect class control care field development role effort rate
heart drug show leader light voice wife police mind price report decision son view relationship town
road arm difference value building action model season society tax director position player record
paper space ground form event official matter center couple site project activity star table need
court oil situation cost industry figure street image phone data picture practice piece land product
doctor wall patient worker news test movie north love support technology step baby computer type
attention film tree source organization hair window evidence population truth song energy stone
river mountain ocean forest garden kitchen engine server request token memory cache block batch
quickly slowly always never often sometimes today tomorrow yesterday here near far above below
good great small large long little old big high different local early young important few public
bad same able late hard major better economic strong possible whole free military true federal
clear recent certain personal open red blue green black white simple quiet bright warm cold
say go get make know think take see come want look use find give tell ask seem feel try leave
call keep let begin help talk turn start run move like live believe hold bring happen write
provide sit stand lose pay meet include continue set learn lead understand watch follow stop
create speak read allow add spend grow offer remember consider appear buy wait serve die send
expect build stay fall cut reach kill remain suggest raise pass sell require decide return explain
""".split()

_NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent Victor Walter".split()
_SYLLABLES = "ka lo mer tin sha ve ron pi dal qu ex st ber gen nol tra vi sor len mu".split()


@functools.cache
def _corpus(num_lines: int = 8000, seed: int = 1234) -> tuple[str, ...]:
    """English-ish lines from a fixed word list; the same on every machine and Python version.

    ``random.Random`` with an int seed is specified to be reproducible across platforms, which is
    what makes the trained merges (and so the whole tokenizer) deterministic.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(num_lines):
        words: list[str] = []
        for _ in range(rng.randint(5, 16)):
            r = rng.random()
            if r < 0.80:
                words.append(rng.choice(_WORDS))
            elif r < 0.87:
                words.append(rng.choice(_NAMES))
            elif r < 0.93:
                # made-up words give the trainer more sub-word merges to learn
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
            else:
                words.append(str(rng.randint(0, 2025)))
        words[0] = words[0].capitalize()
        text = " ".join(words)
        if rng.random() < 0.2:
            cut = rng.randint(1, len(words) - 1)
            text = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
        lines.append(text + rng.choice([".", ".", ".", "?", "!", ":"]))
    # 8000 lines is enough for the trainer to fill a 4096 vocab with real merges (demo model)
    return tuple(lines)


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    """The serialized ``tokenizers.Tokenizer`` for ``vocab_size``; cached because tests build many."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # all 256 bytes up front, so no input is ever out of vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    # Not special: a random model does emit these ids, and decoding them with
    # skip_special_tokens=True should still show that something was generated.
    tok.add_tokens([AddedToken(f"<|extra_{i}|>", special=False, normalized=False) for i in range(missing)])
    return tok.to_str()


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids, built offline.

    Contract:
      * ``len(tokenizer) == vocab_size``: merges learnt from the built-in corpus, then padded with
        added tokens ``<|extra_N|>`` so every id a model can emit decodes to something.
      * Ids 0, 1, 2 are ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``.
      * Byte-level, so any text round-trips through encode/decode.
      * A ChatML ``chat_template`` that honours ``add_generation_prompt``.
      * Deterministic: the same ``vocab_size`` gives the same ``tokenizer.json``.

    Raises ``ValueError`` for ``vocab_size < MIN_VOCAB_SIZE``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level tokenizer needs 256 byte tokens + "
            f"{len(SPECIAL_TOKENS)} special tokens; use vocab_size >= {MIN_VOCAB_SIZE}"
        )
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, wanted {vocab_size}")
    if [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens {SPECIAL_TOKENS} did not get ids 0..{len(SPECIAL_TOKENS) - 1}")
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _make_config(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int | None,
    tie_word_embeddings: bool,
    max_position_embeddings: int,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    rms_norm_eps: float,
    torch_dtype: str,
    eos_id: int,
    moe: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Any:
    """The transformers config for ``arch``, rope given the transformers-5 way (``rope_parameters``).
    ``moe``: the mixture-of-experts fields (``num_experts``, ``num_experts_per_tok``, and for qwen3_moe
    ``moe_intermediate_size``, ``norm_topk_prob``, ``decoder_sparse_step``, ``mlp_only_layers``)."""
    from transformers import (
        Gemma2Config,
        Gemma3Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
        SiglipVisionConfig,
    )

    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(SUPPORTED_ARCHS)}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} not a multiple of kv heads {num_key_value_heads}")
    natural_head_dim = hidden_size // num_attention_heads
    if head_dim is None:
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} not divisible by num_attention_heads={num_attention_heads}")
        head_dim = natural_head_dim
    if arch == "qwen2" and head_dim != natural_head_dim:
        # Qwen2Config has no head_dim field and real Qwen2 checkpoints never carry one: the head
        # size is always hidden/heads. (HF would silently honour an extra `head_dim` attribute,
        # but engines following the real format would not, so a checkpoint with one is a lie.)
        raise ValueError(
            f"qwen2 does not support head_dim={head_dim} != hidden_size/num_attention_heads={natural_head_dim}"
        )
    if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
        raise ValueError(f"rope_scaling must name a non-default rope_type, got {rope_scaling}")

    # transformers 5 keeps every rope setting in one `rope_parameters` dict: the theta plus, for a
    # scaled rope, its type and factors. (4.x had top-level `rope_theta` and `rope_scaling`.)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling is not None:
        rope_parameters = {**rope_scaling, "rope_theta": float(rope_theta)}
        rope_parameters["rope_type"] = rope_parameters.pop("type", None) or rope_parameters["rope_type"]

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
        rms_norm_eps=rms_norm_eps,
        # Qwen-style: no separate BOS token, <|endoftext|> doubles as bos, eos and pad.
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=torch_dtype,
    )
    moe = dict(moe or {})
    common.update(extra_config or {})  # e.g. sliding_window, use_sliding_window, max_window_layers, layer_types
    if arch == "qwen3":
        config = Qwen3Config(**common, head_dim=head_dim)
        config.architectures = ["Qwen3ForCausalLM"]
    elif arch == "qwen3_moe":
        config = Qwen3MoeConfig(**common, head_dim=head_dim, **moe)
        config.architectures = ["Qwen3MoeForCausalLM"]
    elif arch == "mixtral":
        # Mixtral's experts are intermediate_size wide; it has no moe_intermediate_size or norm_topk_prob.
        config = MixtralConfig(
            **common, head_dim=head_dim, num_local_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"],
        )  # fmt: skip
        config.architectures = ["MixtralForCausalLM"]
    elif arch == "qwen2":
        config = Qwen2Config(**common)
        config.architectures = ["Qwen2ForCausalLM"]
    elif arch == "phi3":
        # Phi3Config has no head_dim field: heads are hidden/heads wide (Phi-3 and Phi-4-mini alike).
        if head_dim != natural_head_dim:
            raise ValueError(f"phi3 does not support head_dim={head_dim} != hidden_size/num_attention_heads")
        config = Phi3Config(**common)
        config.architectures = ["Phi3ForCausalLM"]
    elif arch == "mistral":
        config = MistralConfig(**{"sliding_window": None, **common}, head_dim=head_dim)
        config.architectures = ["MistralForCausalLM"]
    elif arch == "gemma2":
        config = Gemma2Config(**common, head_dim=head_dim, hidden_activation="gelu_pytorch_tanh")
        config.architectures = ["Gemma2ForCausalLM"]
    elif arch == "gemma3":
        config = Gemma3TextConfig(**common, head_dim=head_dim, hidden_activation="gelu_pytorch_tanh")
        config.architectures = ["Gemma3ForCausalLM"]
    elif arch == "gemma3_vl":
        text = Gemma3TextConfig(**common, head_dim=head_dim, hidden_activation="gelu_pytorch_tanh")
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=32, patch_size=8)  # fmt: skip
        config = Gemma3Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
            tie_word_embeddings=tie_word_embeddings, dtype=torch_dtype,
        )  # fmt: skip
        # as the hub's configs carry them, at top level
        config.bos_token_id, config.eos_token_id, config.pad_token_id = eos_id, eos_id, eos_id
        config.architectures = ["Gemma3ForConditionalGeneration"]
    else:
        config = LlamaConfig(**common, head_dim=head_dim)
        config.architectures = ["LlamaForCausalLM"]
    return config


def _model_class(arch: str) -> type:
    import transformers


    names = {
        "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "phi3": "Phi3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3_vl": "Gemma3ForConditionalGeneration",
    }  # fmt: skip
    return getattr(transformers, names[arch])


@torch.no_grad()
def _reinit_weights(
    model: nn.Module, seed: int, linear_std: float = LINEAR_STD, embed_std: float = EMBED_STD, gemma: bool = False
) -> None:
    """Overwrite every parameter with the wide, deterministic init described at ``LINEAR_STD`` (``gemma``: its
    norms scale by 1 + w, so w is drawn one lower for the same scales).

    Uses its own generator so the result depends only on ``seed`` and the module order, not on
    whatever the constructor's default init consumed from the global RNG. A vision tower and its
    projector (Gemma 3's vision-language checkpoint) keep the constructor's init: no test reads them.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()  # a tied lm_head shares the embedding tensor: init it once, as an embedding
    for name, module in model.named_modules():
        if "vision_tower" in name or "multi_modal_projector" in name:
            continue
        params = [p for p in module.parameters(recurse=False)]
        if any(id(p) in seen for p in params):
            continue
        seen.update(id(p) for p in params)
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, embed_std, generator=gen)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, linear_std, generator=gen)
            if module.bias is not None:
                module.bias.normal_(0.0, BIAS_STD, generator=gen)
        elif type(module).__name__.endswith(("Experts", "TopKRouter")):
            # stacked expert weights [E, out, in] and the router [E, hidden]: projections like any other, so
            # routing depends on the input as strongly as attention does
            for p in params:
                p.normal_(0.0, LINEAR_STD, generator=gen)
        elif type(module).__name__.endswith("RMSNorm"):
            w = module.weight
            center = QK_NORM_CENTER if name.rsplit(".", 1)[-1] in ("q_norm", "k_norm") else 1.0
            w.copy_(center * (1.0 + (torch.rand(w.shape, generator=gen) * 2.0 - 1.0) * NORM_SPREAD) - float(gemma))
        elif params:
            raise RuntimeError(f"no init rule for {type(module).__name__} parameters")


def _pick_max_shard_size(state_dict: dict[str, torch.Tensor], num_shards: int) -> int:
    """The smallest ``max_shard_size`` (bytes) that splits ``state_dict`` into at most ``num_shards``.

    Shard count only falls as the size limit grows, so bisect. Raises ``ValueError`` when no limit
    gives exactly ``num_shards`` (e.g. more shards than tensors).
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state_dict, max_shard_size=size).filename_to_tensors)

    lo, hi = 1, sum(t.numel() * t.element_size() for t in state_dict.values()) + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= num_shards:
            hi = mid
        else:
            lo = mid + 1
    if count(lo) != num_shards:
        raise ValueError(f"cannot split {len(state_dict)} tensors into exactly {num_shards} shards")
    return lo


def _patch_tokenizer_config(path: pathlib.Path, model_max_length: int) -> None:
    """Make ``tokenizer_config.json`` look like a hub checkpoint's.

    transformers 5 writes ``tokenizer_class: TokenizersBackend``, which 4.x cannot resolve;
    ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both. It also records no
    useful ``model_max_length``; real checkpoints carry the context length.
    """
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = model_max_length
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _rewrite_config_v4(config_path: pathlib.Path) -> None:
    """Reshape a transformers-5 ``config.json`` into what transformers 4.x wrote (most hub checkpoints).

    v4 shape: top-level ``rope_theta`` and ``rope_scaling`` (null when unscaled), ``torch_dtype``
    instead of ``dtype``, no ``rope_parameters``; Qwen configs without ``layer_types``; Gemma 3's local layers'
    rope base as ``rope_local_base_freq``.
    """
    cfg = json.loads(config_path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key == "dtype":
            out["torch_dtype"] = value
        elif key == "layer_types" and all(t == "full_attention" for t in value):
            continue  # older Qwen checkpoints predate this field; absent means all full attention
        else:
            out[key] = value
    if "full_attention" in rope:  # Gemma 3: the global layers' rope at top level, the local layers' base apart
        out["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    out["transformers_version"] = "4.51.3"
    config_path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def build_checkpoint(
    path: str | os.PathLike[str],
    arch: str = "qwen3",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    rms_norm_eps: float = 1e-6,
    config_style: str = "v5",
    num_shards: int = 1,
    seed: int = 0,
    torch_dtype: str = "float32",
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 32,
    norm_topk_prob: bool = True,
    decoder_sparse_step: int = 1,
    mlp_only_layers: list[int] | None = None,
    expert_layout: str = "per_expert",
    extra_config: dict[str, Any] | None = None,
    transformers5_names: bool = False,
    linear_std: float | None = None,
    embed_std: float | None = None,
) -> pathlib.Path:
    """Write a random-weight Hugging Face checkpoint of ``arch`` to ``path`` and return ``path``.

    The directory holds what a hub checkpoint holds: ``config.json`` (``architectures``,
    ``bos/eos_token_id`` set), ``generation_config.json`` with ``eos_token_id`` as the list
    ``[<|endoftext|>, <|im_end|>]``, safetensors weights (``num_shards > 1`` gives
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``) and the tokenizer
    from ``build_tokenizer(vocab_size)``.

    ``head_dim=None`` means ``hidden_size // num_attention_heads``; qwen3 and llama accept any other
    value, qwen2 does not (``ValueError``). ``rope_scaling`` is a 4.x-style dict such as
    ``{"rope_type": "llama3", "factor": 8.0, ...}``. ``config_style="v4"`` rewrites ``config.json`` in
    the transformers-4.x shape; both styles load to the same model. Deterministic in all arguments.

    Mixture-of-experts archs (``qwen3_moe``, ``mixtral``) read ``num_experts``, ``num_experts_per_tok`` and,
    for qwen3_moe, ``moe_intermediate_size``, ``norm_topk_prob``, ``decoder_sparse_step``,
    ``mlp_only_layers`` (mixtral's experts are ``intermediate_size`` wide); dense archs ignore them.
    ``expert_layout``: ``"per_expert"`` writes one tensor per expert and projection (the hub's layout, and
    ``save_pretrained``'s default), ``"stacked"`` the fused ``experts.gate_up_proj`` / ``experts.down_proj``
    tensors transformers 5 holds in memory (``save_original_format=False``).
    ``extra_config``: more fields for the architecture's config class (``sliding_window``, ``use_sliding_window``,
    ``max_window_layers``, ``layer_types``, ...); ``mistral`` has no sliding window unless given one.
    ``transformers5_names``: tensors named as transformers 5 holds them in memory (``save_original_format=False``:
    ``model.language_model.*`` in ``gemma3_vl``, stacked experts) rather than as the hub ships them.
    ``linear_std`` / ``embed_std``: the init scales of projections / embeddings instead of the defaults
    (``LINEAR_STD`` / ``EMBED_STD``, for Gemma ``GEMMA_LINEAR_STD`` / ``GEMMA_EMBED_STD``).
    """
    from transformers import GenerationConfig

    if config_style not in ("v4", "v5"):
        raise ValueError(f"config_style must be 'v4' or 'v5', got {config_style!r}")
    if torch_dtype not in _DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(_DTYPES)}, got {torch_dtype!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}, got {expert_layout!r}")
    path = pathlib.Path(path)
    moe = None
    if arch in MOE_ARCHS:
        moe = dict(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok)
        if arch == "qwen3_moe":
            moe.update(
                moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob,
                decoder_sparse_step=decoder_sparse_step, mlp_only_layers=list(mlp_only_layers or []),
            )  # fmt: skip

    tokenizer = build_tokenizer(vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    config = _make_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=rms_norm_eps,
        torch_dtype=torch_dtype,
        eos_id=eos_id,
        moe=moe,
        extra_config=extra_config,
    )

    torch.manual_seed(seed)
    model = _model_class(arch)(config).eval()
    gemma = arch in GEMMA_ARCHS
    linear_std = linear_std or (GEMMA_LINEAR_STD if gemma else LINEAR_STD)
    embed_std = embed_std or (GEMMA_EMBED_STD if gemma else EMBED_STD)
    _reinit_weights(model, seed, linear_std, embed_std, gemma)
    model.to(_DTYPES[torch_dtype])
    # Real chat checkpoints stop on either end-of-text or end-of-turn.
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id
    )

    max_shard_size: int | str = "50GB"
    if num_shards > 1:
        # what save_pretrained will write: the state dict without the tied lm_head
        state_dict = {
            k: v for k, v in model.state_dict().items() if not (tie_word_embeddings and k == "lm_head.weight")
        }
        max_shard_size = _pick_max_shard_size(state_dict, num_shards)

    path.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    # save_pretrained draws a "Writing model shards" bar on stderr; noise for a fixture or the demo.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(
            path, safe_serialization=True, max_shard_size=max_shard_size,
            save_original_format=expert_layout == "per_expert" and not transformers5_names,
        )  # fmt: skip
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    _patch_tokenizer_config(path / "tokenizer_config.json", max_position_embeddings)

    written = sorted(path.glob("*.safetensors"))
    if num_shards == 1:
        ok = [p.name for p in written] == ["model.safetensors"]
    else:
        ok = len(written) == num_shards and (path / "model.safetensors.index.json").is_file()
    if not ok:
        raise RuntimeError(f"expected {num_shards} safetensors file(s) in {path}, found {[p.name for p in written]}")

    if config_style == "v4":
        _rewrite_config_v4(path / "config.json")
    return path


def build_arch_checkpoint(name: str, root: str | os.PathLike[str]) -> pathlib.Path:
    """Build ``DEFAULT_ARCH_CONFIGS[name]`` into ``root/name`` and return that path."""
    if name not in DEFAULT_ARCH_CONFIGS:
        raise ValueError(f"unknown checkpoint config {name!r}; choose one of {', '.join(DEFAULT_ARCH_CONFIGS)}")
    return build_checkpoint(pathlib.Path(root) / name, **DEFAULT_ARCH_CONFIGS[name])
