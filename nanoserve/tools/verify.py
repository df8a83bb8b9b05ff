"""`nanoserve verify [MODEL]`: does nanoserve, with the settings you will serve with, produce what transformers
produces on your checkpoint?

Both sides decode greedily from the same token ids, one after the other so peak memory is about one model:

1. transformers in float32 with eager attention (the reference; see :mod:`nanoserve.testing.reference`), one
   prompt at a time; then the model is deleted and garbage-collected;
2. nanoserve with the user's engine options (tensor parallel size, dtype, block size, prefix caching, chunked
   prefill, ...), all prompts submitted together as a server would batch them, EOS ignored on both sides.

Per prompt it reports how many output tokens agree before the first divergence, whether that divergence is a
*near-tie*, and the largest ``|Δ log-probability|`` of the chosen tokens over the shared prefix (nanoserve's
from ``SamplingParams(logprobs=0)``, the reference's from ``log_softmax`` of its fp32 logits).

A divergence at output position ``i`` is a near-tie when, under the reference, the token nanoserve chose is
within ``tie_tolerance`` of the reference's choice: ``ref_logprob[top1] - ref_logprob[nanoserve's token] <
tie_tolerance``. When nanoserve picks the runner-up (the usual case) that is exactly the reference's top-2
gap. Such a flip is expected from different but correct rounding (bf16/fp16, a TP all-reduce summing in
another order); anything else is a real divergence. The default tolerance depends on the engine's dtype
(:data:`DEFAULT_TIE_TOLERANCE`).

Low-bit weights: for a compressed-tensors checkpoint the reference is transformers loading that same checkpoint
(it decompresses through the compressed-tensors package; a W8A8 ``int-quantized`` one run with
``--quantization-activations fp32`` is compared against the same tensors with the config's activation
quantization removed); for GPTQ / AWQ, which transformers runs only through gptqmodel / autoawq kernels, and for
asymmetric compressed-tensors experts, which transformers 5 cannot load, it is the dequantized float32 model
(``quantization.export``), and the report says so. For quantize-on-load
(``--quantization int8|int4``) the reference is the float32 checkpoint; there and with int8 activations (a W8A8
checkpoint's default: transformers rounds them its own way) agreement is a *quality figure* (matching tokens,
max ``|Δ logprob|``), not a pass/fail.

Exit status (``nanoserve verify``): 0 when every divergence is a near-tie, 1 otherwise, 2 when verification
could not run (bad options, or transformers cannot load the architecture). ``--json`` prints
:meth:`VerifyReport.to_dict` (fields documented on :class:`VerifyReport` and :class:`PromptResult`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model

DEFAULT_MAX_TOKENS = 32
# Near-tie tolerance (nats) by engine dtype. float32 differs from the reference only by summation order
# (measured |Δ logprob| ~1e-5 on the test checkpoints, TP 1 and 2), so 0.01 is already generous; half
# types round every activation to 8 (bf16) or 11 (fp16) mantissa bits, and the logits of a real model move
# by tenths of a nat.
DEFAULT_TIE_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 0.01, torch.float16: 0.1, torch.bfloat16: 0.25}
# How many of the reference's best tokens to keep per step, to price a divergence that is not the runner-up.
REFERENCE_TOP_K = 5

_LONG_TEXT = (
    "The river had been rising for three days before anyone in the village took it seriously. On the first "
    "morning the ferryman moved his boat ten yards up the bank and laughed about it at the inn; on the second, "
    "the miller carried his sacks to the loft; by the third evening the water stood in the square, brown and "
    "quiet, and the children floated paper ships between the doorsteps while their parents argued about whose "
    "fault it was. Nobody had kept the old dyke in repair, and everybody knew it."
)
BUILTIN_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Hi",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "1, 2, 3, 5, 8, 13, 21,",
    _LONG_TEXT,
    # Shares a long prefix with the one above: with prefix caching on, nanoserve reuses its KV blocks.
    _LONG_TEXT + " The next morning, the mayor",
    "Le renard brun rapide saute par-dessus le chien paresseux. 日本語の文章も少し。",
    "the the the the the the the the the the the the",
    '{"name": "nanoserve", "version": "0.1", "tags": [',
    "Q: What is 17 times 23?\nA:",
)
"""Varied prompts: short and long, prose, code, numbers, JSON, non-Latin scripts, repetition, a shared prefix."""


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """The first output position where the two sides chose different tokens.

    ``top2_gap``: the reference's top-1 minus top-2 log-prob at that step. ``gap_to_choice``: the reference's
    top-1 log-prob minus its log-prob of nanoserve's token (equal to ``top2_gap`` when nanoserve chose the
    runner-up; ``None`` when nanoserve's token is outside the reference's top-5, i.e. at least the gap to the 5th).
    """

    position: int  # index into the generated tokens
    sequence_position: int  # index into prompt + generated tokens
    reference_token: int
    nanoserve_token: int
    reference_text: str
    nanoserve_text: str
    top2_gap: float
    gap_to_choice: float | None
    near_tie: bool


@dataclass(frozen=True)
class PromptResult:
    """One prompt's comparison. ``num_matching``: output tokens identical before the first divergence (all of
    them when there is none). ``max_abs_logprob_diff``: the largest ``|Δ log-prob|`` of the chosen tokens over
    those shared tokens, at output position ``max_abs_logprob_diff_at`` (None with no shared token)."""

    index: int
    prompt: str
    num_prompt_tokens: int
    truncated: bool  # the prompt was cut to fit max_model_len - max_tokens
    num_compared: int  # max_tokens
    num_matching: int
    divergence: Divergence | None
    max_abs_logprob_diff: float
    max_abs_logprob_diff_at: int | None
    reference_token_ids: list[int]
    nanoserve_token_ids: list[int]
    problem: str | None = None  # set when nanoserve returned the wrong number of tokens

    @property
    def ok(self) -> bool:
        return self.problem is None and (self.divergence is None or self.divergence.near_tie)

    @property
    def verdict(self) -> str:
        if self.problem is not None:
            return f"FAILED: {self.problem}"
        d = self.divergence
        if d is None:
            return "identical"
        kind = "near-tie" if d.near_tie else "DIVERGED"
        gap = "outside reference top-5" if d.gap_to_choice is None else f"gap {d.gap_to_choice:.3g}"
        return (
            f"{kind} at output token {d.position} (sequence position {d.sequence_position}; {gap}): "
            f"reference {d.reference_token} {d.reference_text!r}, nanoserve {d.nanoserve_token} {d.nanoserve_text!r}"
        )


@dataclass
class VerifyReport:
    """The whole run. ``ok``: every divergence is a near-tie (the exit status is 0 exactly then).

    ``to_dict()`` fields: ``ok``, ``model``, ``architecture``, ``reference`` (transformers version, dtype,
    device), ``settings`` (the nanoserve engine: tensor_parallel_size, dtype, device, block_size,
    enable_prefix_caching, enable_chunked_prefill, max_num_batched_tokens, max_model_len), ``tie_tolerance``,
    ``max_tokens``, ``totals`` (num_prompts, num_identical, num_near_tie, num_failed, matching_tokens,
    compared_tokens, max_abs_logprob_diff, failed_prompts), and ``prompts``: one object per prompt with the
    :class:`PromptResult` fields, ``ok``, ``verdict`` and ``divergence`` (the :class:`Divergence` fields, or null).
    """

    model: str
    architecture: str
    reference: dict[str, Any]
    settings: dict[str, Any]
    tie_tolerance: float
    max_tokens: int
    prompts: list[PromptResult] = field(default_factory=list)
    # "exact": divergences must be near-ties; "quality": approximate arithmetic (quantize-on-load, int8
    # activations) against the float model, where agreement is reported, not judged.
    mode: str = "exact"

    @property
    def ok(self) -> bool:
        if self.mode == "quality":
            return all(p.problem is None for p in self.prompts)
        return all(p.ok for p in self.prompts)

    @property
    def failures(self) -> list[PromptResult]:
        return [p for p in self.prompts if not p.ok]

    def totals(self) -> dict[str, Any]:
        diffs = [p.max_abs_logprob_diff for p in self.prompts]
        return {
            "num_prompts": len(self.prompts),
            "num_identical": sum(p.divergence is None and p.problem is None for p in self.prompts),
            "num_near_tie": sum(p.divergence is not None and p.divergence.near_tie for p in self.prompts),
            "num_failed": len(self.failures),
            "matching_tokens": sum(p.num_matching for p in self.prompts),
            "compared_tokens": sum(p.num_compared for p in self.prompts),
            "max_abs_logprob_diff": max(diffs, default=0.0),
            "failed_prompts": [p.index for p in self.failures],
        }

    def to_dict(self) -> dict[str, Any]:
        prompts = []
        for p in self.prompts:
            d = p.divergence
            prompts.append(
                {
                    "index": p.index,
                    "prompt": p.prompt,
                    "num_prompt_tokens": p.num_prompt_tokens,
                    "truncated": p.truncated,
                    "num_compared": p.num_compared,
                    "num_matching": p.num_matching,
                    "ok": p.ok,
                    "verdict": p.verdict,
                    "divergence": None if d is None else {k: getattr(d, k) for k in d.__dataclass_fields__},
                    "max_abs_logprob_diff": p.max_abs_logprob_diff,
                    "max_abs_logprob_diff_at": p.max_abs_logprob_diff_at,
                    "problem": p.problem,
                    "reference_token_ids": p.reference_token_ids,
                    "nanoserve_token_ids": p.nanoserve_token_ids,
                }
            )
        return {
            "ok": self.ok,
            "mode": self.mode,
            "model": self.model,
            "architecture": self.architecture,
            "reference": self.reference,
            "settings": self.settings,
            "tie_tolerance": self.tie_tolerance,
            "max_tokens": self.max_tokens,
            "totals": self.totals(),
            "prompts": prompts,
        }

    def format_text(self) -> str:
        s = self.settings
        lines = [
            f"nanoserve verify: {self.model} ({self.architecture})",
            f"  reference: transformers {self.reference['transformers']}, {self.reference['dtype']}, eager attention, "
            f"{self.reference['device']}" + (f"; {self.reference['kind']}" if self.reference.get("kind") else ""),
            f"  nanoserve: tensor_parallel_size={s['tensor_parallel_size']} dtype={s['dtype']} "
            f"kv_cache_dtype={s['kv_cache_dtype']} device={s['device']} "
            f"block_size={s['block_size']} prefix_caching={'on' if s['enable_prefix_caching'] else 'off'} "
            f"chunked_prefill={'on' if s['enable_chunked_prefill'] else 'off'}",
            f"  greedy, {self.max_tokens} tokens per prompt; a divergence is a near-tie when the reference's "
            f"log-prob of nanoserve's token is within {self.tie_tolerance:g} of its top choice",
            "",
            f"  {'#':>2}  {'prompt':<34} {'tokens':>6}  {'match':>7}  {'max|Δlogprob|':>13}  result",
        ]
        for p in self.prompts:
            shown = _shorten(p.prompt, 34)
            tokens = f"{p.num_prompt_tokens}{'*' if p.truncated else ''}"
            lines.append(
                f"  {p.index:>2}  {shown:<34} {tokens:>6}  {f'{p.num_matching}/{p.num_compared}':>7}  "
                f"{p.max_abs_logprob_diff:>13.2e}  {p.verdict}"
            )
        if any(p.truncated for p in self.prompts):
            lines.append("  * prompt cut to fit max_model_len - max_tokens")
        t = self.totals()
        lines += [
            "",
            f"total: {t['num_prompts']} prompts: {t['num_identical']} identical, {t['num_near_tie']} near-tie "
            f"divergences, {t['num_failed']} failed; {t['matching_tokens']}/{t['compared_tokens']} tokens matched "
            f"before any divergence; max |Δ logprob| over shared tokens {t['max_abs_logprob_diff']:.2e}",
        ]
        if self.mode == "quality":
            lines.append(
                f"QUALITY ({self.settings.get('quantization')}): {t['matching_tokens']}/{t['compared_tokens']} tokens "
                f"agree with the float32 model before the first divergence, max |Δ logprob| "
                f"{t['max_abs_logprob_diff']:.2e} (approximate arithmetic: reported, not judged)"
            )
        elif self.ok and t["num_near_tie"] == 0:
            lines.append("PASS: no divergence")
        elif self.ok:
            lines.append(f"PASS: every divergence ({t['num_near_tie']}) is a near-tie")
        else:
            for p in self.failures:
                lines.append(f"FAIL: prompt {p.index} {_shorten(p.prompt, 40)!r}: {p.verdict}")
        return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# The reference side
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSteps:
    """transformers' greedy continuation of one prompt, with the top-``REFERENCE_TOP_K`` log-probs of each step
    (``hf_greedy``'s ``ReferenceOutput`` plus the runners-up, so a divergence can be priced exactly)."""

    token_ids: list[int]
    logprobs: list[float]
    top2_gaps: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@torch.no_grad()
def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> ReferenceSteps:
    """Same decode loop as :func:`nanoserve.testing.reference.hf_greedy` (explicit positions, DynamicCache, no
    generation_config, argmax of fp32 logits), also keeping each step's top-k."""
    import inspect

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers 5 renamed past_key_values to cache; accept both.
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model(
        input_ids=ids, position_ids=torch.arange(len(prompt), device=device)[None], use_cache=True, **{cache_kw: cache}
    )
    steps = ReferenceSteps([], [], [], [], [])
    for step in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # [V]
        token = int(torch.argmax(logp))  # first index on ties, as nanoserve's greedy sampler
        top_lp, top_ids = torch.topk(logp, min(REFERENCE_TOP_K, logp.numel()))
        steps.token_ids.append(token)
        steps.logprobs.append(float(logp[token]))
        steps.top2_gaps.append(float(top_lp[0] - top_lp[1]) if top_lp.numel() > 1 else math.inf)
        steps.top_ids.append(top_ids.tolist())
        steps.top_logprobs.append(top_lp.tolist())
        if step + 1 == max_new_tokens:
            break
        position = torch.tensor([[len(prompt) + step]], device=device)
        next_ids = torch.tensor([[token]], dtype=torch.long, device=device)
        out = model(input_ids=next_ids, position_ids=position, use_cache=True, **{cache_kw: cache})
    return steps


def run_reference(
    model_path: str, prompts: list[list[int]], max_tokens: int, device: str, progress: bool,
    load_options: dict[str, Any] | None = None,
) -> list[ReferenceSteps]:  # fmt: skip
    """Load the checkpoint in transformers (fp32), decode every prompt, and free the model before returning."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from nanoserve.testing.reference import load_hf_model

    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # from_pretrained draws its own "Loading weights" bar
    try:
        model = load_hf_model(model_path, torch.float32, **(load_options or {}))
    except ValueError as exc:
        raise ValueError(
            f"verify needs transformers as the reference, and it cannot load this checkpoint: {exc}"
        ) from exc
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    try:
        if device == "cuda":
            model.to("cuda")
        bar = tqdm(prompts, desc="transformers (reference)", disable=not progress, dynamic_ncols=True, file=sys.stderr)
        return [reference_greedy(model, p, max_tokens) for p in bar]
    finally:
        # Peak memory is one model, not two: the reference is gone before nanoserve loads.
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Comparison (pure)
# ---------------------------------------------------------------------------------------------------------


def compare(
    index: int,
    prompt: str,
    prompt_ids: list[int],
    reference: ReferenceSteps,
    ours: list[int],
    our_logprobs: list[float],
    tie_tolerance: float,
    truncated: bool = False,
    decode: Any = None,
) -> PromptResult:
    """Compare one prompt's two greedy continuations. ``decode(ids) -> str`` renders tokens for the report."""
    decode = decode or (lambda ids: "")
    expected = len(reference.token_ids)
    shared = 0
    while shared < min(expected, len(ours)) and reference.token_ids[shared] == ours[shared]:
        shared += 1
    divergence = None
    problem = None
    if shared < min(expected, len(ours)):
        ref_tok, our_tok = reference.token_ids[shared], ours[shared]
        top_ids, top_lps = reference.top_ids[shared], reference.top_logprobs[shared]
        gap = top_lps[0] - top_lps[top_ids.index(our_tok)] if our_tok in top_ids else None
        divergence = Divergence(
            position=shared,
            sequence_position=len(prompt_ids) + shared,
            reference_token=ref_tok,
            nanoserve_token=our_tok,
            reference_text=decode([ref_tok]),
            nanoserve_text=decode([our_tok]),
            top2_gap=reference.top2_gaps[shared],
            gap_to_choice=gap,
            near_tie=gap is not None and gap < tie_tolerance,
        )
    elif len(ours) != expected:
        problem = f"nanoserve returned {len(ours)} tokens, expected {expected}"
    diffs = [abs(reference.logprobs[i] - our_logprobs[i]) for i in range(shared)]
    worst = max(range(shared), key=lambda i: diffs[i]) if shared else None
    return PromptResult(
        index=index,
        prompt=prompt,
        num_prompt_tokens=len(prompt_ids),
        truncated=truncated,
        num_compared=expected,
        num_matching=shared,
        divergence=divergence,
        max_abs_logprob_diff=diffs[worst] if worst is not None else 0.0,
        max_abs_logprob_diff_at=worst,
        reference_token_ids=list(reference.token_ids),
        nanoserve_token_ids=list(ours),
        problem=problem,
    )


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL (every non-empty line an object with a ``"prompt"`` string), otherwise one
    prompt per non-empty line (taken literally)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--prompts {str(path)!r}: the file has no prompts")
    if lines[0].lstrip().startswith("{"):
        prompts = []
        for n, line in enumerate(lines, start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--prompts {str(path)!r} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(
                    f'--prompts {str(path)!r} line {n}: expected an object with a non-empty "prompt" string'
                )
            prompts.append(obj["prompt"])
        return prompts
    return lines


def default_tie_tolerance(dtype: torch.dtype) -> float:
    return DEFAULT_TIE_TOLERANCE.get(dtype, max(DEFAULT_TIE_TOLERANCE.values()))


def run_verify(
    model: str | None = None,
    *,
    prompts: list[str] | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    tie_tolerance: float | None = None,
    progress: bool = True,
    **engine_options: Any,
) -> VerifyReport:
    """Run the reference, then nanoserve with ``engine_options`` (``LLM``'s keyword options), and compare.

    ``prompts``: texts (default :data:`BUILTIN_PROMPTS`), tokenized once with the engine's tokenizer so both
    sides decode from identical ids; a prompt longer than ``max_model_len - max_tokens`` keeps its first tokens.
    ``tie_tolerance``: None picks :func:`default_tie_tolerance` of the engine's dtype. Raises ValueError for bad
    options or when transformers cannot load the checkpoint.
    """
    import transformers

    from nanoserve.config import EngineConfig
    from nanoserve.engine.llm_engine import load_tokenizer
    from nanoserve.llm import LLM
    from nanoserve.sampling_params import SamplingParams

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    if tie_tolerance is not None and not tie_tolerance >= 0:
        raise ValueError(f"tie_tolerance: must be >= 0, got {tie_tolerance!r}")
    path = resolve_model(model)
    # Validate every option (and learn max_model_len and the dtype) before spending time on the reference.
    config = EngineConfig.create(path, **engine_options)
    # A float16 KV cache rounds keys and values to 11 bits: its near-ties are as wide as a float16 model's.
    default = max(default_tie_tolerance(config.dtype), default_tie_tolerance(config.kv_cache_dtype))
    tolerance = default if tie_tolerance is None else float(tie_tolerance)
    texts = list(BUILTIN_PROMPTS if prompts is None else prompts)
    if not texts:
        raise ValueError("prompts: need at least one prompt")
    room = config.max_model_len - max_tokens
    if room < 1:
        raise ValueError(
            f"max_tokens ({max_tokens}) leaves no room for a prompt in max_model_len ({config.max_model_len})"
        )
    tokenizer = load_tokenizer(config.tokenizer)
    token_prompts: list[list[int]] = []
    truncated: list[bool] = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text).input_ids)
        if not ids:
            raise ValueError(f"prompt {i} ({text!r}) tokenizes to nothing")
        truncated.append(len(ids) > room)
        token_prompts.append(ids[:room])

    with tempfile.TemporaryDirectory(prefix="nanoserve-verify-") as scratch:
        from nanoserve.models.moe import MoeForCausalLM
        from nanoserve.models.registry import resolve_architecture

        experts = issubclass(resolve_architecture(config.hf_config), MoeForCausalLM)
        ref_path, load_options, kind, mode = _reference_for(path, config.quantization, Path(scratch), experts)
        reference = run_reference(ref_path, token_prompts, max_tokens, config.device, progress, load_options)

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    with LLM(path, **engine_options) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in token_prompts], params, use_tqdm=progress)
    report = VerifyReport(
        model=path,
        architecture=", ".join(getattr(config.hf_config, "architectures", None) or ["?"]),
        reference={"transformers": transformers.__version__, "dtype": "float32", "device": config.device, "kind": kind},
        mode=mode,
        settings={
            "tensor_parallel_size": config.tensor_parallel_size,
            "dtype": str(config.dtype).removeprefix("torch."),
            "kv_cache_dtype": str(config.kv_cache_dtype).removeprefix("torch."),
            "device": config.device,
            "block_size": config.block_size,
            "enable_prefix_caching": config.enable_prefix_caching,
            "enable_chunked_prefill": config.enable_chunked_prefill,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_model_len": config.max_model_len,
            "quantization": config.quantization.describe() if config.quantization else None,
        },
        tie_tolerance=tolerance,
        max_tokens=max_tokens,
    )
    for i, (text, ids, ref, out) in enumerate(zip(texts, token_prompts, reference, outputs)):
        completion = out.outputs[0]
        ours = list(completion.token_ids)
        our_logprobs = [entry[tok].logprob for tok, entry in zip(ours, completion.logprobs or [])]
        report.prompts.append(
            compare(i, text, ids, ref, ours, our_logprobs, tolerance, truncated[i], decode=tokenizer.decode)
        )
    return report


def _reference_for(
    path: str, quant: Any, scratch: Path, experts: bool = False
) -> tuple[str, dict[str, Any], str | None, str]:
    """(checkpoint the reference loads, its from_pretrained options, what it is, "exact" or "quality").
    ``experts``: the model is a mixture of experts."""
    if quant is None:
        return path, {}, None, "exact"
    mode = "quality" if quant.on_load or quant.activations == "int8" else "exact"
    if quant.on_load:
        return path, {}, "the float32 checkpoint (quantize-on-load: agreement is a quality figure)", mode
    if quant.tensor_format == "int-quantized":
        return _int_quantized_reference(path, quant, scratch, mode)
    # transformers 5 fuses per-expert tensors into stacked experts at load, and that conversion drops an
    # asymmetric scheme's zero points ("Asymmetric quant requires zero-point values"; transformers 5.24 with
    # compressed-tensors 0.20.1): such a checkpoint is checked against nanoserve's widening, as GPTQ is.
    if quant.method == "compressed-tensors" and not (experts and quant.scheme.asymmetric):
        from transformers import CompressedTensorsConfig

        # Asymmetric zero points are packed along the outputs, which transformers' default compressed path
        # cannot size; dequantize=True decompresses at load instead (exact for float32 scales).
        options = {} if not quant.scheme.asymmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        return path, options, "the same checkpoint, decompressed by transformers + compressed-tensors", mode
    from nanoserve.quantization.export import write_dequantized_checkpoint

    widened = write_dequantized_checkpoint(path, scratch / "dequantized", quant)
    why = (
        "transformers cannot load asymmetric experts" if quant.method == "compressed-tensors"
        else "transformers runs it only through gptqmodel / autoawq kernels"
    )  # fmt: skip
    return str(widened), {}, (
        f"the dequantized float32 model ({quant.method}: {why}, so nanoserve's own unpacking is the reference here)"
    ), mode


def _int_quantized_reference(path: str, quant: Any, scratch: Path, mode: str) -> tuple[str, dict[str, Any], str, str]:
    """compressed-tensors W8A8: transformers decompresses the int8 weights itself, and fake-quantizes each
    quantized Linear's input per token with its own rounding (scale max|x| / 127.5, codes -128..127; nanoserve
    divides by 127, as vLLM does), so with int8 activations agreement is a quality figure. With fp32 activations
    the reference is the same tensors with input_activations removed from the config: weights only, exact."""
    group = next(iter(quant.raw["config_groups"].values()))
    if quant.activations == "int8" or not group.get("input_activations"):
        rounding = " (it rounds activations per token with scale max|x|/127.5, nanoserve with max|x|/127)"
        return path, {}, "the same checkpoint, run by transformers + compressed-tensors" + (
            rounding if group.get("input_activations") else ""
        ), mode  # fmt: skip
    weight_only = scratch / "weight-only"
    weight_only.mkdir()
    for f in Path(path).iterdir():
        if f.is_file() and f.name != "config.json":
            (weight_only / f.name).symlink_to(f.resolve())
    config = json.loads((Path(path) / "config.json").read_text())
    for g in config["quantization_config"]["config_groups"].values():
        g["input_activations"] = None
    (weight_only / "config.json").write_text(json.dumps(config))
    return str(weight_only), {}, (
        "the same int8 weights, decompressed by transformers + compressed-tensors, without its activation "
        "quantization (input_activations removed), as quantization_activations=fp32 runs them"
    ), mode


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="compare nanoserve's greedy output with transformers on a checkpoint (exit 1 on a real divergence)",
        description=__doc__.split("\n\n")[0],
    )
    add_engine_args(p)
    g = p.add_argument_group("verify")
    g.add_argument(
        "--prompts",
        default=None,
        help='file with one prompt per line, or JSONL with {"prompt": ...} (default: built-in set)',
    )
    g.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens generated per prompt")
    g.add_argument(
        "--tie-tolerance", type=float, default=None,
        help="a divergence is a near-tie when the reference's log-prob of nanoserve's token is within this of its "
        "top choice (default: 0.01 float32, 0.1 float16, 0.25 bfloat16)",
    )  # fmt: skip
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    prompts = read_prompts_file(args.prompts) if args.prompts else None
    report = run_verify(
        args.model,
        prompts=prompts,
        max_tokens=args.max_tokens,
        tie_tolerance=args.tie_tolerance,
        progress=not args.no_progress,
        **engine_kwargs(args),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0 if report.ok else 1
