"""`nanoserve plan` and `nanoserve verify` on a compressed-tensors W8A8 (int-quantized) checkpoint."""

from __future__ import annotations

import pathlib

import pytest

from nanoserve.config import EngineConfig
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.runner.model_runner import ModelRunner
from nanoserve.testing.checkpoints import build_checkpoint
from nanoserve.tools.plan import make_plan
from nanoserve.tools.verify import run_verify
from tests.quant_packers import write_quantized_checkpoint


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("w8a8tools")
    model = build_checkpoint(root / "m", arch="qwen3", seed=21)
    quantized, _ = write_quantized_checkpoint(model, root / "w8a8", "int-quantized", 8, -1, True)
    return quantized


def test_plan_counts_the_int8_bytes_the_runner_holds(w8a8: pathlib.Path) -> None:
    plan = make_plan(str(w8a8), kv_cache_memory="1MiB")
    runner = ModelRunner(EngineConfig.create(str(w8a8), kv_cache_memory="1MiB"), TPGroup())
    (rank,) = plan.ranks
    assert rank.weight_bytes == runner.weight_bytes()
    two = make_plan(str(w8a8), kv_cache_memory="1MiB", tensor_parallel_size=2)
    assert two.ranks[0].weights.attention < rank.weights.attention


def test_verify_w8a8_reports_a_quality_figure_against_transformers_on_the_checkpoint(w8a8: pathlib.Path) -> None:
    report = run_verify(str(w8a8), progress=False, max_tokens=12, kv_cache_memory="64MiB")
    assert report.mode == "quality" and report.ok, report.format_text()
    assert "same checkpoint" in report.reference["kind"] and "127.5" in report.reference["kind"]
    assert report.settings["quantization"].startswith("compressed-tensors int-quantized")
    assert "int8 activations" in report.settings["quantization"]


def test_verify_w8a8_with_fp32_activations_is_exact_against_its_weights(w8a8: pathlib.Path) -> None:
    report = run_verify(
        str(w8a8), progress=False, max_tokens=12, kv_cache_memory="64MiB", quantization_activations="fp32"
    )
    assert report.mode == "exact" and report.ok, report.format_text()
    assert "input_activations removed" in report.reference["kind"]
    t = report.totals()
    assert t["matching_tokens"] >= 0.8 * t["compared_tokens"]  # ok: any divergence is a near-tie
