"""The output processor without a model: a character tokenizer, tokens fed one step at a time."""

from __future__ import annotations

import copy

import pytest

from nanoserve.engine.output_processor import OutputProcessor
from nanoserve.engine.sequence import Sequence
from nanoserve.layers.sampler import SampledLogprobs
from nanoserve.sampling_params import RequestOutputKind, SamplingParams

EOS = 1


class CharTokenizer:
    """Token id = code point (id 1 is EOS, decoded as nothing)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)


def run(text: str, params: SamplingParams, logprobs: bool = False) -> tuple[list, Sequence]:
    """Feed ``text`` one character per step; returns every output and the sequence."""
    proc = OutputProcessor(CharTokenizer(), {EOS}, max_model_len=1000)
    prompt = [ord(c) for c in "prompt"]
    seq = Sequence(0, "r", 0, list(prompt), len(prompt), params)
    proc.add_request("r", "prompt", prompt, params, [seq], 0.0)
    outputs = []
    for ch in text:
        seq.token_ids.append(ord(ch))
        lp = SampledLogprobs(-0.5, 1, [ord(ch)], [-0.5]) if logprobs else None
        step = proc.process([seq], [lp] if logprobs else None, [])
        outputs += step.outputs
        for f in step.finished:
            f.seq.finish_reason = f.reason  # what the scheduler does with the decision
        if step.finished:
            break
    return outputs, seq


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 100, "output_kind": RequestOutputKind.DELTA, **kw})


def test_streamed_text_never_takes_back_the_start_of_a_stop_string() -> None:
    outputs, _ = run("abXYZcd", params(stop=["XYZ"]))
    sent = [o.outputs[0].text for o in outputs]
    assert "".join(sent) == "ab" and not any("X" in s for s in sent)
    assert outputs[-1].outputs[0].finish_reason == "stop" and outputs[-1].outputs[0].stop_reason == "XYZ"
    # The last len("XYZ") - 1 characters wait until the next one shows they do not begin the stop string.
    assert sent == ["", "", "a", "b", ""]


def test_a_kept_stop_string_that_began_in_released_text_still_stops() -> None:
    outputs, _ = run("aXYZb", params(stop=["XYZ"], include_stop_str_in_output=True))
    assert "".join(o.outputs[0].text for o in outputs) == "aXYZ"
    assert outputs[-1].outputs[0].finish_reason == "stop"


def test_a_false_start_is_released_once_it_cannot_be_a_stop() -> None:
    outputs, _ = run("aXYq" + "w" * 5, params(stop=["XYZ"], max_tokens=9))
    assert "".join(o.outputs[0].text for o in outputs) == "aXYqwwwww"
    assert outputs[-1].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY])
def test_every_output_kind_ends_in_the_same_final_output(kind: RequestOutputKind) -> None:
    text = "hello world, stop here"
    base = dict(max_tokens=100, stop=["here"], logprobs=1)
    reference, _ = run(text, SamplingParams(**base, output_kind=RequestOutputKind.CUMULATIVE), logprobs=True)
    outputs, _ = run(text, SamplingParams(**base, output_kind=kind), logprobs=True)
    if kind is RequestOutputKind.FINAL_ONLY:
        assert len(outputs) == 1
    if kind is RequestOutputKind.DELTA:
        merged = copy.deepcopy(outputs[0])
        for later in outputs[1:]:
            merged.add(later)
        final = merged
        # each delta carries only its own new token
        assert all(len(o.outputs[0].token_ids) == 1 for o in outputs)
    else:
        final = outputs[-1]
    want = reference[-1].outputs[0]
    got = final.outputs[0]
    assert final.finished and reference[-1].finished
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == ("hello world, stop ", want.token_ids,
                                                                              "stop", "here")  # fmt: skip
    assert got.text == want.text and got.logprobs == want.logprobs and len(got.logprobs) == len(got.token_ids)


def test_stop_tokens_wait_for_min_tokens_and_add_no_text() -> None:
    outputs, seq = run("ab" + chr(EOS) + "c" + chr(EOS), params(min_tokens=4))
    final = outputs[-1].outputs[0]
    assert final.finish_reason == "stop" and seq.token_ids[-1] == EOS and seq.num_output_tokens == 5
    assert "".join(o.outputs[0].text for o in outputs) == "abc"


def test_held_text_is_bounded_by_the_longest_stop() -> None:
    proc = OutputProcessor(CharTokenizer(), {EOS}, max_model_len=10_000)
    p = params(stop=["abcdef", "xy"], max_tokens=5000)
    seq = Sequence(0, "r", 0, [ord("p")], 1, p)
    proc.add_request("r", None, [ord("p")], p, [seq], 0.0)
    sample = proc.requests["r"].samples[0]
    for i in range(2000):
        seq.token_ids.append(ord("abcde"[i % 5]))
        proc.process([seq], None, [])
        assert len(sample.held) <= 5 and len(sample.tail) <= 5
