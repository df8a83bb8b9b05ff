"""`nanoserve verify`: passes on correct engines (TP 1 and 2), fails naming the prompt and position when one
weight of the nanoserve side is perturbed, and prices divergences correctly (pure comparison tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoserve.cli import main
from nanoserve.testing.reference import hf_greedy, load_hf_model
from nanoserve.tools import verify
from nanoserve.tools.verify import ReferenceSteps, compare, read_prompts_file, reference_greedy, run_verify

SMALL = dict(kv_cache_memory="2MiB", block_size=4)
CLI_SMALL = ("--kv-cache-memory", "2MiB", "--block-size", "4", "--no-progress")
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 5, 8,", "the the the the the"]


def steps(tokens: list[int], logprobs: list[float], runners_up: list[tuple[int, float]]) -> ReferenceSteps:
    """A reference whose step i chose tokens[i] (log-prob logprobs[i]) over runners_up[i] = (token, log-prob)."""
    return ReferenceSteps(
        token_ids=tokens,
        logprobs=logprobs,
        top2_gaps=[lp - r[1] for lp, r in zip(logprobs, runners_up)],
        top_ids=[[t, r[0]] for t, r in zip(tokens, runners_up)],
        top_logprobs=[[lp, r[1]] for lp, r in zip(logprobs, runners_up)],
    )


# ---- the comparison ----------------------------------------------------------------------------------------


def test_identical_outputs_report_the_largest_logprob_difference() -> None:
    ref = steps([5, 6, 7], [-0.5, -1.0, -2.0], [(9, -3.0)] * 3)
    result = compare(0, "p", [1, 2], ref, [5, 6, 7], [-0.5, -1.25, -1.9], tie_tolerance=0.01)
    assert result.ok and result.divergence is None
    assert result.num_matching == 3
    assert result.max_abs_logprob_diff == pytest.approx(0.25)
    assert result.max_abs_logprob_diff_at == 1


def test_runner_up_within_tolerance_is_a_near_tie() -> None:
    ref = steps([5, 6, 7], [-0.5, -0.70, -2.0], [(9, -3.0), (8, -0.705), (9, -3.0)])
    result = compare(3, "p", [1, 2, 3], ref, [5, 8, 4], [-0.5, -0.71, -1.0], tie_tolerance=0.01)
    assert result.ok
    d = result.divergence
    assert d is not None and d.near_tie
    assert (d.position, d.sequence_position, d.reference_token, d.nanoserve_token) == (1, 4, 6, 8)
    assert d.gap_to_choice == pytest.approx(0.005)
    # Only the shared prefix counts towards the log-prob difference (position 1 is past the divergence).
    assert result.num_matching == 1 and result.max_abs_logprob_diff == 0.0


def test_divergence_beyond_tolerance_fails_and_names_the_position() -> None:
    ref = steps([5, 6], [-0.5, -0.7], [(9, -3.0), (8, -0.9)])
    result = compare(2, "my prompt", [1], ref, [5, 8], [-0.5, -0.9], tie_tolerance=0.1)
    assert not result.ok
    assert result.divergence is not None and not result.divergence.near_tie
    assert "output token 1" in result.verdict and "DIVERGED" in result.verdict


def test_a_choice_outside_the_reference_top_k_is_not_a_tie_even_when_top2_is_close() -> None:
    # The reference's own top two are 0.001 apart, but nanoserve chose a third token it never ranked.
    ref = steps([5], [-0.7], [(8, -0.701)])
    result = compare(0, "p", [1], ref, [42], [-0.7], tie_tolerance=0.01)
    assert result.divergence is not None and result.divergence.top2_gap < 0.01
    assert result.divergence.gap_to_choice is None and not result.ok


def test_missing_tokens_are_a_failure() -> None:
    ref = steps([5, 6], [-0.5, -0.7], [(9, -3.0)] * 2)
    result = compare(0, "p", [1], ref, [5], [-0.5], tie_tolerance=0.01)
    assert not result.ok and "returned 1 tokens, expected 2" in (result.problem or "")


def test_prompt_files_lines_and_jsonl(tmp_path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\n  second one \n")
    assert read_prompts_file(lines) == ["first prompt", "  second one "]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\nmulti-line"}) + "\n" + json.dumps({"prompt": "b", "id": 2}) + "\n")
    assert read_prompts_file(jsonl) == ["a\nmulti-line", "b"]
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_prompts_file(jsonl)


def test_reference_variant_matches_hf_greedy(checkpoint) -> None:
    """verify's decode loop keeps the top-k; its tokens, log-probs and gaps must be hf_greedy's exactly."""
    path = checkpoint("llama-gqa")
    prompts = [[7, 100, 33, 250, 4], [301, 12]]
    expected = hf_greedy(path, prompts, 10)
    model = load_hf_model(path)
    for prompt, want in zip(prompts, expected):
        got = reference_greedy(model, prompt, 10)
        assert got.token_ids == want.token_ids
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-6)
        assert got.top2_gaps == pytest.approx(want.top2_gaps, abs=1e-6)
        assert all(ids[0] == t for ids, t in zip(got.top_ids, got.token_ids))


# ---- end to end --------------------------------------------------------------------------------------------


def test_cli_passes_on_builtin_prompts_tp1(checkpoint, capsys) -> None:
    path = str(checkpoint("qwen2-mqa-bias"))
    rc = main(["verify", path, "--max-tokens", "12", *CLI_SMALL, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0, report["totals"]
    assert set(report) == {
        "ok",
        "mode",
        "model",
        "architecture",
        "reference",
        "settings",
        "tie_tolerance",
        "max_tokens",
        "totals",
        "prompts",
    }
    assert report["ok"] and report["mode"] == "exact" and report["totals"]["num_prompts"] == len(verify.BUILTIN_PROMPTS)
    assert report["totals"]["failed_prompts"] == []
    # fp32 against fp32: every shared token's log-prob agrees closely, and most prompts match completely.
    assert report["totals"]["max_abs_logprob_diff"] < 1e-3
    assert report["totals"]["matching_tokens"] > 0.8 * report["totals"]["compared_tokens"]
    assert report["settings"]["block_size"] == 4 and report["tie_tolerance"] == 0.01
    for p in report["prompts"]:
        assert len(p["nanoserve_token_ids"]) == 12 and p["num_prompt_tokens"] <= 512 - 12


def test_passes_with_tensor_parallel_2(checkpoint) -> None:
    report = run_verify(str(checkpoint("qwen3-gqa")), prompts=PROMPTS, max_tokens=12, progress=False,
                        tensor_parallel_size=2, **SMALL)  # fmt: skip
    assert report.ok, report.format_text()
    assert report.settings["tensor_parallel_size"] == 2
    assert report.totals()["max_abs_logprob_diff"] < 1e-3
    assert "PASS" in report.format_text()


def test_one_perturbed_weight_fails_naming_prompt_and_position(checkpoint, hf_reference, monkeypatch, capsys) -> None:
    """Test double: after nanoserve loads its weights, scale the last layer's down projection. transformers is
    untouched, so nanoserve's tokens must part from the reference, and verify must say where."""
    from nanoserve.runner import model_runner

    real_load = model_runner.load_weights

    def load_then_perturb(model, model_dir, show_progress=False):
        real_load(model, model_dir, show_progress=show_progress)
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight.mul_(1.5)

    monkeypatch.setattr(model_runner, "load_weights", load_then_perturb)
    path = str(checkpoint("llama-gqa"))
    argv = ["verify", path, "--max-tokens", "12", *CLI_SMALL]
    rc = main(argv + ["--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1
    failed = [p for p in report["prompts"] if not p["ok"]]
    assert failed and report["totals"]["failed_prompts"] == [p["index"] for p in failed]
    assert [p["index"] for p in report["prompts"]] == list(range(len(verify.BUILTIN_PROMPTS)))
    for p in failed:
        d = p["divergence"]
        pos = d["position"]
        # Independently: the reference tokens are transformers' own greedy tokens for that prompt...
        ids = load_prompt_ids(path, p["prompt"], 512 - 12)
        (expected,) = hf_reference("llama-gqa", [ids], 12)
        assert p["reference_token_ids"] == expected.token_ids
        # ...and the named position is exactly where the two sequences first differ, by more than a tie.
        assert p["reference_token_ids"][:pos] == p["nanoserve_token_ids"][:pos]
        assert p["reference_token_ids"][pos] != p["nanoserve_token_ids"][pos]
        assert d["gap_to_choice"] is None or d["gap_to_choice"] >= report["tie_tolerance"]
        assert d["sequence_position"] == p["num_prompt_tokens"] + pos

    # The text report names them too.
    rc = main(argv)
    text = capsys.readouterr().out
    assert rc == 1
    first = failed[0]
    assert f"FAIL: prompt {first['index']} " in text
    assert f"output token {first['divergence']['position']} " in text


def load_prompt_ids(path: str, text: str, limit: int) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(path)(text).input_ids)[:limit]


def test_clear_error_when_transformers_cannot_load_the_architecture(checkpoint, monkeypatch, capsys) -> None:
    """Test double: transformers rejects the config class, as it does for an architecture it does not know."""
    import transformers

    def reject(*args, **kwargs):
        raise ValueError("Unrecognized configuration class <class 'Qwen3Config'> for this kind of AutoModel")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reject)
    rc = main(["verify", str(checkpoint("qwen3-gqa")), "--max-tokens", "4", *CLI_SMALL])
    err = capsys.readouterr().err
    assert rc == 2
    assert "verify needs transformers as the reference" in err
    assert "cannot load architecture ['Qwen3ForCausalLM']" in err


def test_bad_options_fail_before_the_reference_runs(checkpoint) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        run_verify(str(checkpoint("qwen3-gqa")), max_tokens=0)
    with pytest.raises(ValueError, match="leaves no room"):
        run_verify(str(checkpoint("qwen3-gqa")), max_tokens=600, progress=False)
    assert math.isfinite(verify.default_tie_tolerance(torch.bfloat16))
