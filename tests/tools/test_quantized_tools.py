"""`nanoserve plan` and `nanoserve verify` on low-bit weights: plan's bytes are the quantized layers' own, and
verify picks the right oracle for each kind of checkpoint (and says which)."""

from __future__ import annotations

import pathlib

import pytest

from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.testing.checkpoints import build_checkpoint
from nanoserve.tools.plan import make_plan, probe
from nanoserve.tools.verify import run_verify
from tests.quant_packers import write_quantized_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_checkpoint(tmp_path_factory.mktemp("qtools") / "m", arch="qwen3", tie_word_embeddings=True, seed=21)


@pytest.mark.parametrize(
    "options",
    [dict(quantization="int8"), dict(quantization="int4", quantization_group_size=32, quantization_zero_point=True)],
    ids=["int8", "int4-asym"],
)
def test_plan_counts_the_quantized_bytes_the_runner_holds(model: pathlib.Path, options: dict) -> None:
    fp32 = make_plan(str(model), kv_cache_memory="1MiB")
    plan = make_plan(str(model), kv_cache_memory="1MiB", **options)
    runner = ModelRunner(EngineConfig.create(str(model), kv_cache_memory="1MiB", **options), TPGroup())
    (rank,) = plan.ranks
    assert rank.weight_bytes == runner.weight_bytes()
    # The projections shrink to codes + scales; the tied embedding stays float and the LM head is added in int8.
    assert rank.weights.attention < fp32.ranks[0].weights.attention / 3
    assert rank.weights.mlp < fp32.ranks[0].weights.mlp / 3
    assert rank.weights.embedding == fp32.ranks[0].weights.embedding
    assert 0 < rank.weights.lm_head < fp32.ranks[0].weights.embedding / 3


def test_plan_probe_agrees_at_tp2(model: pathlib.Path) -> None:
    options = dict(quantization="int4", quantization_group_size=32, kv_cache_memory="1MiB", tensor_parallel_size=2)
    plan = make_plan(str(model), **options)
    result = probe(plan, str(model), **options)
    assert result.kv_cache_info is not None, result.error
    assert plan.ranks[0].weight_bytes == result.weight_bytes_rank0
    assert result.matches, result.differences


def test_verify_compressed_tensors_against_transformers_on_the_same_checkpoint(model, tmp_path) -> None:
    quantized, _ = write_quantized_checkpoint(model, tmp_path / "ct", "compressed-tensors", 4, 32, False)
    report = run_verify(str(quantized), progress=False, max_tokens=12, kv_cache_memory="64MiB")
    assert report.mode == "exact" and report.ok, report.format_text()
    assert "compressed-tensors" in report.reference["kind"]
    assert report.totals()["matching_tokens"] == report.totals()["compared_tokens"]


def test_verify_gptq_against_the_dequantized_model_and_says_so(model, tmp_path) -> None:
    quantized, _ = write_quantized_checkpoint(model, tmp_path / "gptq", "gptq", 4, 32, True, desc_act=True)
    report = run_verify(str(quantized), progress=False, max_tokens=12, kv_cache_memory="64MiB")
    assert report.mode == "exact" and report.ok, report.format_text()
    assert "dequantized float32 model" in report.format_text()
    # ok: any divergence is a near-tie (summation order); the tokens before it agree.
    assert report.totals()["matching_tokens"] >= 0.8 * report.totals()["compared_tokens"]


def test_verify_quantize_on_load_reports_a_quality_figure(model) -> None:
    report = run_verify(
        str(model), progress=False, max_tokens=12, kv_cache_memory="64MiB", quantization="int4",
        quantization_group_size=32,
    )  # fmt: skip
    text = report.format_text()
    assert report.mode == "quality" and report.ok  # reported, not judged ...
    assert "QUALITY" in text and "tokens agree with the float32 model" in text
    t = report.totals()
    assert t["matching_tokens"] < t["compared_tokens"]  # ... and int4 on std-0.2 random weights does differ
    assert report.to_dict()["settings"]["quantization"].startswith("int4")
