"""Default sampling settings from generation_config.json (vLLM's ``--generation-config auto|vllm|FOLDER``):
which keys count, where they are read from, and what ``LLM`` and ``nanoserve generate`` do with them."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from nanoserve import LLM, SamplingParams
from nanoserve.config import EngineConfig
from nanoserve.generation_defaults import GenerationDefaults, resolve_generation_defaults
from tests.conftest import CheckpointCache

# Qwen3-style recommendations plus keys that must not become defaults (vLLM reads only six keys).
QWEN3_LIKE = {
    "bos_token_id": 0,
    "eos_token_id": [0, 2],
    "pad_token_id": 0,
    "do_sample": False,  # vLLM ignores it: the temperature below still applies
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 7,
    "max_length": 50,
    "num_beams": 4,
    "typical_p": 0.5,
    "presence_penalty": 1.5,
}
EXPECTED = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1, max_tokens=7)
LLM_OPTIONS = dict(block_size=8, kv_cache_memory="1MiB", max_model_len=128)


def checkpoint_with(checkpoint: CheckpointCache, tmp_path: pathlib.Path, generation_config: dict | None) -> str:
    """A copy of the tiny qwen3 checkpoint whose generation_config.json is ``generation_config`` (None: none)."""
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen3-gqa"), path)
    target = path / "generation_config.json"
    if generation_config is None:
        target.unlink()
    else:
        target.write_text(json.dumps(generation_config))
    return str(path)


def defaults_of(model: str, generation_config: str = "auto") -> GenerationDefaults:
    return resolve_generation_defaults(EngineConfig.create(model, generation_config=generation_config))


def test_auto_reads_the_six_sampling_keys_and_nothing_else(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, QWEN3_LIKE)
    defaults = defaults_of(model)
    assert defaults.params == EXPECTED  # max_new_tokens became max_tokens; do_sample, num_beams, ... ignored
    assert str(pathlib.Path(model) / "generation_config.json") in defaults.source
    assert defaults.summary().startswith("default sampling params: temperature=0.6, top_p=0.95, top_k=20")


def test_null_keys_count_as_unset(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, {"temperature": None, "top_p": 0.8, "max_new_tokens": None})
    assert defaults_of(model).params == {"top_p": 0.8}


def test_a_generation_config_without_sampling_keys_leaves_the_built_in_defaults(checkpoint) -> None:
    # The test checkpoints' own generation_config.json holds only token ids.
    defaults = defaults_of(str(checkpoint("qwen3-gqa")))
    assert defaults.params == {}
    assert defaults.sampling_params() == SamplingParams()
    assert "built-in" in defaults.summary()


def test_vllm_ignores_the_file(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, QWEN3_LIKE)
    defaults = defaults_of(model, "vllm")
    assert defaults.params == {}
    assert "--generation-config vllm" in defaults.summary()


def test_a_folder_is_read_instead_of_the_model(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, QWEN3_LIKE)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "max_new_tokens": 3}))
    defaults = defaults_of(model, str(folder))
    assert defaults.params == {"temperature": 0.3, "max_tokens": 3}
    assert str(folder / "generation_config.json") in defaults.source


def test_without_generation_config_the_keys_of_config_json_count(checkpoint, tmp_path) -> None:
    """As in vLLM (``GenerationConfig.from_model_config``): older checkpoints keep them in config.json."""
    model = checkpoint_with(checkpoint, tmp_path, None)
    assert defaults_of(model).params == {}
    config_path = pathlib.Path(model) / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "temperature": 0.7, "do_sample": True}))
    defaults = defaults_of(model)
    assert defaults.params == {"temperature": 0.7}
    assert "config.json" in defaults.source


@pytest.mark.parametrize("value", ["nope", "", "/no/such/folder"])
def test_generation_config_must_be_auto_vllm_or_a_folder_with_the_file(checkpoint, value: str) -> None:
    with pytest.raises(ValueError, match="generation_config"):
        EngineConfig.create(str(checkpoint("qwen3-gqa")), generation_config=value)


def test_a_folder_without_generation_config_json_is_refused(checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="generation_config"):
        EngineConfig.create(str(checkpoint("qwen3-gqa")), generation_config=str(tmp_path))


@pytest.mark.parametrize(
    "content, why",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_tokens"),
        ({"top_k": "20"}, "top_k"),
        ("[1, 2]", "JSON object"),
        ("{not json", "cannot read"),
    ],
)
def test_a_bad_default_is_refused_naming_the_file(checkpoint, tmp_path, content: object, why: str) -> None:
    model = checkpoint_with(checkpoint, tmp_path, {})
    path = pathlib.Path(model) / "generation_config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=why) as info:
        defaults_of(model)
    assert str(path) in str(info.value)


def test_llm_generate_without_params_uses_the_checkpoint_defaults(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, {**QWEN3_LIKE, "temperature": 0.0})
    prompt = {"prompt_token_ids": [5, 17, 99, 230, 41]}
    with LLM(model, **LLM_OPTIONS) as llm:
        default = llm.get_default_sampling_params()
        assert (default.temperature, default.top_p, default.top_k, default.max_tokens) == (0.0, 0.95, 20, 7)
        assert (default.min_p, default.repetition_penalty) == (0.05, 1.1)
        default.temperature = 2.0  # a fresh object each call: changing one leaves the defaults alone
        assert llm.get_default_sampling_params().temperature == 0.0
        [out] = llm.generate(prompt, use_tqdm=False)
        [same] = llm.generate(prompt, SamplingParams(**{**EXPECTED, "temperature": 0.0}), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == same.outputs[0].token_ids


def test_llm_with_vllm_generation_config_keeps_the_built_in_defaults(checkpoint, tmp_path) -> None:
    model = checkpoint_with(checkpoint, tmp_path, QWEN3_LIKE)
    with LLM(model, generation_config="vllm", **LLM_OPTIONS) as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
        [out] = llm.generate({"prompt_token_ids": [5, 17, 99]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out.outputs[0].token_ids) <= 2


def test_generate_cli_prints_the_defaults_in_force(checkpoint, tmp_path, capsys) -> None:
    from nanoserve.cli import main

    model = checkpoint_with(checkpoint, tmp_path, QWEN3_LIKE)
    flags = ["--kv-cache-memory", "1MiB", "--max-model-len", "128", "--block-size", "8"]
    assert main(["generate", model, "--prompt", "hello", "--temperature", "0", *flags]) == 0
    err = capsys.readouterr().err
    assert "default sampling params: temperature=0.6, top_p=0.95, top_k=20" in err
    assert main(["generate", model, "--prompt", "hello", "--generation-config", "vllm", *flags]) == 0
    assert "default sampling params: nanoserve's built-in ones (--generation-config vllm)" in capsys.readouterr().err


def test_engine_flag_reaches_the_engine_config() -> None:
    from nanoserve.cli import build_parser
    from nanoserve.engine_args import engine_kwargs

    for command in ("generate", "serve", "plan", "verify"):
        extra = ["--prompt", "x"] if command == "generate" else []
        args = build_parser().parse_args([command, "--generation-config", "vllm", *extra])
        assert engine_kwargs(args)["generation_config"] == "vllm"
        assert engine_kwargs(build_parser().parse_args([command, *extra]))["generation_config"] == "auto"
