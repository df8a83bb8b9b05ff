"""Tests for the offline checkpoint builder, the transformers reference and the demo checkpoint."""

from __future__ import annotations

import hashlib
import json
import pathlib
import random

import pytest
import torch
import transformers

from nanoserve.testing import checkpoints
from nanoserve.testing.checkpoints import (
    DEFAULT_ARCH_CONFIGS,
    EOS_TOKEN,
    IM_END_TOKEN,
    MIN_VOCAB_SIZE,
    build_arch_checkpoint,
    build_checkpoint,
    build_tokenizer,
)
from nanoserve.testing.reference import hf_greedy, load_hf_model
from nanoserve.tools import demo

TEXT = "Hello world, the quick brown fox jumps over 13 lazy dogs!\n\tSecond line: ok? <|im_end|> done."

EXPECTED_ARCHITECTURE = {
    "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3_vl": "Gemma3ForConditionalGeneration",
}  # fmt: skip


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_prompts(vocab_size: int, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # skip the 3 special ids: a prompt of plain tokens, as a user would send
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(4, 24))] for _ in range(n)]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("arch_ckpts")
    return {name: build_arch_checkpoint(name, root) for name in DEFAULT_ARCH_CONFIGS}


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 503, 512, 4096])
def test_tokenizer_has_exact_vocab_and_round_trips(vocab_size: int) -> None:
    tok = build_tokenizer(vocab_size)
    assert len(tok) == vocab_size
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    # every id a model can emit decodes, including the padding tokens at the top
    for i in (0, vocab_size // 2, vocab_size - 1):
        assert isinstance(tok.decode([i]), str) and tok.decode([i]) != ""
    assert tok.convert_ids_to_tokens(vocab_size - 1) is not None


def test_tokenizer_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(MIN_VOCAB_SIZE - 1)


def test_tokenizer_is_deterministic() -> None:
    first = build_tokenizer(512).backend_tokenizer.to_str()
    checkpoints._trained_tokenizer_json.cache_clear()  # force a second training run
    second = build_tokenizer(512).backend_tokenizer.to_str()
    assert first == second


def test_chat_template_renders() -> None:
    tok = build_tokenizer(512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    # special tokens are single ids, so an engine can stop on <|im_end|>
    ids = tok.encode(text)
    assert ids.count(tok.convert_tokens_to_ids(IM_END_TOKEN)) == 2


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", list(DEFAULT_ARCH_CONFIGS))
def test_arch_checkpoint_loads_and_greedy_is_diverse(name: str, arch_dirs: dict[str, pathlib.Path]) -> None:
    path = arch_dirs[name]
    kwargs = DEFAULT_ARCH_CONFIGS[name]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_ARCHITECTURE[kwargs["arch"]]]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]  # [<|endoftext|>, <|im_end|>]
    assert config["eos_token_id"] == 0 and config["bos_token_id"] == 0

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = load_hf_model(path)
    vocab = model.config.get_text_config().vocab_size  # a vision-language config holds it in text_config
    assert len(tok) == vocab == kwargs.get("vocab_size", 512)

    outs = hf_greedy(None, _random_prompts(vocab, 2, seed=list(DEFAULT_ARCH_CONFIGS).index(name)), 20, model=model)
    for out in outs:
        assert len(out.token_ids) == len(out.logprobs) == len(out.top2_gaps) == 20
        assert len(set(out.token_ids)) >= 14, out.token_ids
        assert all(lp <= 0.0 for lp in out.logprobs)
        assert all(g >= 0.0 for g in out.top2_gaps)


def test_arch_specific_shapes(arch_dirs: dict[str, pathlib.Path]) -> None:
    q3 = load_hf_model(arch_dirs["qwen3-gqa"])
    attn = q3.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 32 and attn.k_proj.out_features == 2 * 32  # head_dim 32 != 64/4

    q2 = load_hf_model(arch_dirs["qwen2-mqa-bias"])
    attn = q2.model.layers[0].self_attn
    assert attn.k_proj.out_features == 16  # one kv head
    assert attn.q_proj.bias is not None and attn.q_proj.bias.abs().min() > 0  # biases really nonzero

    tied = load_hf_model(arch_dirs["qwen3-tied"])
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    q_norm = tied.model.layers[0].self_attn.q_norm.weight
    assert not torch.allclose(q_norm, torch.ones_like(q_norm))


def test_reference_ignores_eos(arch_dirs: dict[str, pathlib.Path]) -> None:
    model = load_hf_model(arch_dirs["llama-gqa"])
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits tie at 0, so argmax is id 0 == EOS at every step
    out = hf_greedy(None, [[5, 6, 7]], 7, model=model)[0]
    assert out.token_ids == [0] * 7
    assert out.top2_gaps == [0.0] * 7


def test_reference_matches_full_forward(arch_dirs: dict[str, pathlib.Path]) -> None:
    # the cached decode loop must agree with re-running the whole sequence without a cache
    model = load_hf_model(arch_dirs["qwen2-mqa-bias"])
    prompt = _random_prompts(model.config.vocab_size, 1, seed=7)[0]
    out = hf_greedy(None, [prompt], 8, model=model)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids[:-1]]), use_cache=False).logits[0].float()
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("name", ["llama3-rope-scaling", "qwen3-gqa"])
def test_v4_config_is_equivalent_to_v5(name: str, tmp_path: pathlib.Path) -> None:
    kwargs = {k: v for k, v in DEFAULT_ARCH_CONFIGS[name].items() if k != "config_style"}
    v5 = build_checkpoint(tmp_path / "v5", **kwargs, config_style="v5")
    v4 = build_checkpoint(tmp_path / "v4", **kwargs, config_style="v4")

    raw = json.loads((v4 / "config.json").read_text())
    assert "rope_parameters" not in raw and "dtype" not in raw
    assert raw["torch_dtype"] == "float32"
    assert raw["rope_theta"] == kwargs.get("rope_theta", 10000.0)
    assert raw["rope_scaling"] == kwargs.get("rope_scaling")
    assert "rope_parameters" in json.loads((v5 / "config.json").read_text())

    c4 = transformers.AutoConfig.from_pretrained(v4)
    c5 = transformers.AutoConfig.from_pretrained(v5)
    assert c4.rope_parameters == c5.rope_parameters
    assert c4.rope_parameters["rope_theta"] == kwargs.get("rope_theta", 10000.0)
    assert c4.head_dim == c5.head_dim and c4.dtype == c5.dtype

    assert _sha256(v4 / "model.safetensors") == _sha256(v5 / "model.safetensors")
    ids = torch.tensor(_random_prompts(c5.vocab_size, 1, seed=3))
    with torch.no_grad():
        # positions past original_max_position_embeddings (64) exercise the llama3 scaling
        ids = torch.cat([ids, torch.arange(3, 103)[None]], dim=1)
        l4 = load_hf_model(v4)(ids).logits
        l5 = load_hf_model(v5)(ids).logits
    assert torch.equal(l4, l5)


def test_rope_scaling_changes_the_model(tmp_path: pathlib.Path) -> None:
    # guards against the scaling dict being silently dropped somewhere between kwargs and the model
    kwargs = dict(DEFAULT_ARCH_CONFIGS["llama3-rope-scaling"])
    scaled = build_checkpoint(tmp_path / "scaled", **kwargs)
    kwargs["rope_scaling"] = None
    plain = build_checkpoint(tmp_path / "plain", **kwargs)
    ids = torch.arange(3, 203)[None]
    with torch.no_grad():
        assert not torch.allclose(load_hf_model(scaled)(ids).logits, load_hf_model(plain)(ids).logits)


def test_sharded_checkpoint(arch_dirs: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    path = arch_dirs["qwen3-sharded"]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    # same weights as the unsharded build
    kwargs = {k: v for k, v in DEFAULT_ARCH_CONFIGS["qwen3-sharded"].items() if k != "num_shards"}
    single = build_checkpoint(tmp_path / "single", **kwargs)
    a = load_hf_model(path).state_dict()
    b = load_hf_model(single).state_dict()
    assert a.keys() == b.keys() and set(index["weight_map"]) <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_is_deterministic_and_seed_matters(tmp_path: pathlib.Path) -> None:
    a = build_checkpoint(tmp_path / "a", "qwen2", seed=11)
    b = build_checkpoint(tmp_path / "b", "qwen2", seed=11)
    c = build_checkpoint(tmp_path / "c", "qwen2", seed=12)
    assert _sha256(a / "model.safetensors") == _sha256(b / "model.safetensors") != _sha256(c / "model.safetensors")


def test_bfloat16_checkpoint(tmp_path: pathlib.Path) -> None:
    path = build_checkpoint(tmp_path / "bf16", "llama", torch_dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    out = hf_greedy(path, [[5, 6, 7, 8]], 4, dtype=torch.bfloat16)[0]
    assert len(out.token_ids) == 4


def test_invalid_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="qwen2 does not support head_dim"):
        build_checkpoint(tmp_path / "x", "qwen2", head_dim=32)
    with pytest.raises(ValueError, match="qwen3, qwen2, llama"):
        build_checkpoint(tmp_path / "y", "gpt2")
    with pytest.raises(ValueError, match="exactly 50 shards"):
        build_checkpoint(tmp_path / "z", "llama", num_shards=50)


def test_load_hf_model_names_unknown_architecture(arch_dirs: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((arch_dirs["llama-gqa"] / "config.json").read_text())
    cfg.update(architectures=["NotARealForCausalLM"], model_type="not_a_real_model")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="NotARealForCausalLM"):
        load_hf_model(bad)


# ---------------------------------------------------------------------------------------------- demo


def test_demo_model_is_deterministic_and_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = pathlib.Path(demo.demo_model_path(str(tmp_path / "one")))
    monkeypatch.setenv("NANOSERVE_CACHE_DIR", str(tmp_path / "two"))
    second = pathlib.Path(demo.demo_model_path())
    assert first.name == second.name == "demo-qwen3-v1"
    assert second.parent == tmp_path / "two"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert _sha256(first / name) == _sha256(second / name), name
    assert list((tmp_path / "two").iterdir()) == [second]  # no temp dirs left behind

    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["head_dim"]) == (4096, 256, 64)
    assert config["tie_word_embeddings"] is True
    assert len(transformers.AutoTokenizer.from_pretrained(first)) == 4096

    # a second call must not rebuild
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("demo checkpoint rebuilt although cached")

    monkeypatch.setattr(checkpoints, "build_checkpoint", fail)
    before = (second / "model.safetensors").stat().st_mtime_ns
    assert demo.demo_model_path() == str(second)
    assert (second / "model.safetensors").stat().st_mtime_ns == before


def test_demo_model_survives_losing_the_race(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = checkpoints.build_checkpoint
    final = tmp_path / "demo-qwen3-v1"

    def build_then_lose(path: pathlib.Path, **kwargs: object) -> pathlib.Path:
        # another process finishes first while we are still writing
        real_build(final, **kwargs)
        return real_build(path, **kwargs)

    monkeypatch.setattr(checkpoints, "build_checkpoint", build_then_lose)
    assert demo.demo_model_path(str(tmp_path)) == str(final)
    assert list(tmp_path.iterdir()) == [final]
