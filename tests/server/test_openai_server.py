"""The OpenAI-compatible server end to end: the official ``openai`` client (and raw HTTP for exact error bodies)
against ``nanoserve serve`` running as a subprocess on a tiny checkpoint (one server for the session)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanoserve import LLM, SamplingParams

IGNORE_EOS = {"ignore_eos": True}


# ---- helpers -----------------------------------------------------------------------------------------
def scrape(http: httpx.Client) -> dict[str, float]:
    """/metrics as {'name' or 'name{label="v"}': value}."""
    resp = http.get("/metrics")
    assert resp.status_code == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- basics ------------------------------------------------------------------------------------------
def test_models_and_health(server, client, http) -> None:
    assert [m.id for m in client.models.list().data] == [server.served_name]
    assert http.get("/health").status_code == 200


def test_completion_usage_and_default_max_tokens(server, client, http) -> None:
    prompt = "The quick brown fox"
    num_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    r = client.completions.create(model=server.served_name, prompt=prompt, max_tokens=7, temperature=0,
                                  extra_body={**IGNORE_EOS, "return_token_ids": True})  # fmt: skip
    (choice,) = r.choices
    assert r.model == server.served_name and r.object == "text_completion"
    assert choice.finish_reason == "length" and len(choice.token_ids) == 7
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (num_prompt, 7, num_prompt + 7)
    # Completions default to 16 tokens, as in OpenAI's API.
    r = client.completions.create(model=server.served_name, prompt=prompt, temperature=0, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 16


def test_completion_stream_equals_non_stream(server, client) -> None:
    kw = dict(model=server.served_name, prompt="Once upon a time", max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(p.text for p in pieces) == full
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # A stream carries what is new since the client last read, so a reader that falls behind (a loaded CI box
    # starving the handler) may get 12 tokens in one piece. Over 96 tokens, it must not get them all at once.
    long_kw = {**kw, "max_tokens": 96}
    long_pieces = [ch for ch in client.completions.create(**long_kw, stream=True) if ch.choices]
    assert len(long_pieces) > 1, "the answer was not streamed"
    assert "".join(ch.choices[0].text for ch in long_pieces) == client.completions.create(**long_kw).choices[0].text


def test_chat_non_stream_and_stream(server, client, http) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    num_prompt = http.post("/tokenize", json={"messages": messages}).json()["count"]
    kw = dict(model=server.served_name, messages=messages, max_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.message.content
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (num_prompt, 10)

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(p.delta.content or "" for p in pieces) == choice.message.content
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == num_prompt and chunks[-1].usage.completion_tokens == 10


def test_chat_default_max_tokens_fills_the_context(server, client) -> None:
    r = client.chat.completions.create(model=server.served_name, messages=[{"role": "user", "content": "Go on"}],
                                       temperature=0, extra_body=IGNORE_EOS)  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == server.max_model_len


def test_echo(server, client) -> None:
    kw = dict(model=server.served_name, prompt="Echo me", max_tokens=5, temperature=0, extra_body=IGNORE_EOS)
    plain = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw, echo=True).choices[0].text == "Echo me" + plain
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, echo=True, stream=True))
    assert streamed == "Echo me" + plain


def test_several_prompts_in_one_request_stream_and_not(server, client) -> None:
    kw = dict(model=server.served_name, prompt=["First prompt", "Second one", "Third"], max_tokens=6, temperature=0,
              extra_body=IGNORE_EOS)  # fmt: skip
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    assert full.usage.completion_tokens == 18
    texts = ["", "", ""]
    for ch in client.completions.create(**kw, stream=True):
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in sorted(full.choices, key=lambda c: c.index)]


def test_n2_completions_and_chat_stream(server, client) -> None:
    kw = dict(
        model=server.served_name, prompt="Hello", n=2, max_tokens=8, temperature=1.0, seed=5, extra_body=IGNORE_EOS
    )
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 16

    chat = dict(model=server.served_name, messages=[{"role": "user", "content": "Two answers"}], n=2, max_tokens=8,
                temperature=1.0, seed=11, extra_body=IGNORE_EOS)  # fmt: skip
    full = client.chat.completions.create(**chat)
    texts, finishes = ["", ""], [None, None]
    for ch in client.chat.completions.create(**chat, stream=True):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert finishes == ["length", "length"]
    # Seeded samples are reproducible, so the streamed pieces must add up to the same two answers.
    assert texts == [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]


def test_stop_string_non_stream_and_stream(server, client) -> None:
    kw = dict(model=server.served_name, prompt="A list of things:", max_tokens=24, temperature=0, extra_body=IGNORE_EOS)
    # Where the text breaks between streamed pieces: a stop string across such a break is only found after the
    # first half was produced, which is what streaming must not leak.
    pieces = [ch.choices[0].text for ch in client.completions.create(**kw, stream=True)]
    base = "".join(pieces)
    breaks = [sum(len(p) for p in pieces[:i]) for i in range(2, len(pieces))]
    cut = next(b for b in breaks if b >= 2 and b + 2 <= len(base) and base[b - 1 : b + 2].strip())
    stop = base[cut - 1 : cut + 2]
    expected = base[: base.index(stop)]

    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == stop
    streamed = list(client.completions.create(**kw, stop=[stop], stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(server, client) -> None:
    r = client.completions.create(model=server.served_name, prompt="Numbers:", max_tokens=6, temperature=0,
                                  logprobs=3, extra_body=IGNORE_EOS)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= 4  # the top 3, plus the sampled token if it is not among them
        assert top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picked the most likely token


def test_chat_logprobs(server, client) -> None:
    kw = dict(model=server.served_name, messages=[{"role": "user", "content": "Say something"}], max_tokens=5,
              temperature=0, logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS)  # fmt: skip
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        if entry.token.startswith("bytes:"):  # part of a UTF-8 character, shown the way OpenAI does
            assert entry.token == "bytes:" + "".join(f"\\x{b:02x}" for b in entry.bytes)
        else:
            assert entry.bytes == list(entry.token.encode())
    streamed = [e for ch in client.chat.completions.create(**kw, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_prompt_logprobs_and_echo_with_logprobs(server, client, http) -> None:
    """prompt_logprobs (completions: per choice; chat: on the response) as the engine computes them offline, and
    echo with logprobs: the prompt's tokens lead the legacy logprobs lists, the first without a logprob."""
    prompt = "Count with me: one two three four five"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    kw = dict(model=server.served_name, prompt=prompt, max_tokens=4, temperature=0)
    r = client.completions.create(**kw, extra_body={**IGNORE_EOS, "prompt_logprobs": 2})
    got = r.choices[0].model_extra["prompt_logprobs"]
    with LLM(str(server.model_path), **dict(server.engine_options)) as llm:
        (want,) = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                               prompt_logprobs=2), use_tqdm=False)  # fmt: skip
    assert len(got) == len(ids) and got[0] is None and want.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry, expected = got[pos], want.prompt_logprobs[pos]
        assert {int(t) for t in entry} == set(expected), f"position {pos}"
        for t, lp in expected.items():
            assert entry[str(t)]["logprob"] == pytest.approx(lp.logprob, abs=1e-4) and entry[str(t)]["rank"] == lp.rank
            text = entry[str(t)]["decoded_token"]  # part of a UTF-8 character shows as bytes:\x.., as in logprobs
            assert text == http.post("/detokenize", json={"tokens": [t]}).json()["prompt"] or text.startswith("bytes:")

    echoed = client.completions.create(**kw, echo=True, logprobs=2, extra_body=IGNORE_EOS).choices[0]
    lp = echoed.logprobs
    assert echoed.text.startswith(prompt) and len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(got[pos][str(ids[pos])]["logprob"], abs=1e-5)
        assert len(lp.top_logprobs[pos]) >= 2
    assert "".join(lp.tokens) == echoed.text and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    plain = client.completions.create(**kw, logprobs=2, extra_body=IGNORE_EOS).choices[0].logprobs
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.token_logprobs, abs=1e-5)
    chunks = list(client.completions.create(**kw, echo=True, logprobs=2, stream=True, extra_body=IGNORE_EOS))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)

    chat = client.chat.completions.create(model=server.served_name, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=3, temperature=0, extra_body={"prompt_logprobs": 0})  # fmt: skip
    chat_ids = http.post("/tokenize", json={"messages": [{"role": "user", "content": prompt}]}).json()["tokens"]
    plp = chat.model_extra["prompt_logprobs"]
    assert len(plp) == len(chat_ids) and plp[0] is None
    assert all(list(e) == [str(t)] for e, t in zip(plp[1:], chat_ids[1:])), "k = 0: just the prompt's own token"


def test_usage_reports_cached_prompt_tokens_and_continuous_stream_usage(server, client) -> None:
    prompt = "a prefix worth caching, " * 12  # several 16-token blocks
    kw = dict(model=server.served_name, prompt=prompt, max_tokens=6, temperature=0, extra_body=IGNORE_EOS)
    client.completions.create(**kw)
    again = client.completions.create(**kw).usage
    assert again.prompt_tokens_details.cached_tokens >= 32
    assert again.prompt_tokens_details.cached_tokens <= again.prompt_tokens
    fresh = client.completions.create(**{**kw, "prompt": "an unrelated prompt never sent before 7d1"}).usage
    assert fresh.prompt_tokens_details.cached_tokens == 0

    chunks = list(client.completions.create(**kw, stream=True, logprobs=0, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))  # fmt: skip
    with_choices = [ch for ch in chunks if ch.choices]
    assert with_choices and all(ch.usage is not None for ch in with_choices)
    # How many chunks the 6 tokens come in depends on timing (a consumer that falls behind gets them merged);
    # each chunk's usage counts the tokens streamed up to and including it, which its logprobs list.
    streamed = 0
    for ch in with_choices:
        streamed += len(ch.choices[0].logprobs.tokens) if ch.choices[0].logprobs else 0
        assert ch.usage.completion_tokens == streamed
    assert streamed == 6
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens_details.cached_tokens >= 32
    plain = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.usage is None for ch in plain if ch.choices) and plain[-1].usage.completion_tokens == 6
    chat_chunks = list(client.chat.completions.create(
        model=server.served_name, messages=[{"role": "user", "content": prompt}], max_tokens=5, temperature=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body=IGNORE_EOS,
    ))  # fmt: skip
    assert all(ch.usage is not None for ch in chat_chunks[1:]) and chat_chunks[-1].usage.completion_tokens == 5


def test_seed_reproducibility(server, client) -> None:
    kw = dict(model=server.served_name, prompt="Random words", max_tokens=12, temperature=1.0, extra_body=IGNORE_EOS)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    assert client.completions.create(**kw, seed=1234).choices[0].text == a
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (1, 2, 3)}
    assert others - {a}, "different seeds all gave the same sample"


def test_greedy_matches_llm_generate(server, client, http) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
    token_prompt = [11, 22, 33, 44, 55, 66]
    extra = {**IGNORE_EOS, "return_token_ids": True}
    kw = dict(model=server.served_name, max_tokens=16, temperature=0, logprobs=1, extra_body=extra)
    batch = sorted(client.completions.create(prompt=prompts, **kw).choices, key=lambda c: c.index)
    single = client.completions.create(prompt=token_prompt, **kw).choices
    messages = [{"role": "user", "content": "Parity check, please."}]
    chat = client.chat.completions.create(model=server.served_name, messages=messages, max_tokens=16, temperature=0,
                                          extra_body=extra).choices  # fmt: skip
    chat_ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    with LLM(str(server.model_path), **dict(server.engine_options)) as llm:
        # Same batches as the server ran, so even the floating-point sums match.
        expected = llm.generate(prompts, params, use_tqdm=False)
        expected += llm.generate([token_prompt], params, use_tqdm=False)
        expected += llm.generate([{"prompt_token_ids": chat_ids}], params, use_tqdm=False)
    got = [(c.token_ids, c.text) for c in batch + single] + [(chat[0].token_ids, chat[0].message.content)]
    assert got == [(o.outputs[0].token_ids, o.outputs[0].text) for o in expected]
    for c, o in zip(batch + single, expected):
        want = [o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)]
        assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)


def test_tokenize_detokenize(server, http) -> None:
    tok = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == server.max_model_len
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    assert_error(http.post("/detokenize", json={"tokens": [1, 10**6]}), 400, param="tokens")


# ---- batching, disconnects, metrics ------------------------------------------------------------------
def _steps_over_8(m: dict[str, float]) -> float:
    return m["nanoserve_seqs_per_step_count"] - m['nanoserve_seqs_per_step_bucket{le="8.0"}']


def test_32_concurrent_streams_are_batched(server, http) -> None:
    before = scrape(http)

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, int, str | None]:
        stream = await c.completions.create(model=server.served_name, prompt=f"Request number {i} says", max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=IGNORE_EOS)  # fmt: skip
        text, usage, finish = "", 0, None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage.completion_tokens
        return text, usage, finish

    async def run_all() -> list[tuple[str, int, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=server.url("/v1"), api_key=server.api_key, max_retries=0, timeout=120
        ) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert [(usage, finish) for _, usage, finish in results] == [(20, "length")] * 32
    after = scrape(http)
    assert after["nanoserve_max_seqs_in_step"] >= 16
    assert _steps_over_8(after) - _steps_over_8(before) >= 5, "the 32 requests were not run together"
    assert after["nanoserve_generation_tokens_total"] - before["nanoserve_generation_tokens_total"] >= 32 * 20


def _idle_and_all_blocks_free(http: httpx.Client) -> bool:
    m = scrape(http)
    return (m["nanoserve_num_requests_running"] == 0 and m["nanoserve_num_requests_in_flight"] == 0
            and m["nanoserve_kv_blocks_free"] == m["nanoserve_kv_blocks_total"])  # fmt: skip


def test_streaming_client_disconnect_aborts_and_frees_blocks(server, http) -> None:
    wait_for(lambda: _idle_and_all_blocks_free(http), 30, "the server to be idle")
    before = scrape(http)
    body = {"model": server.served_name, "prompt": "A very long story begins", "max_tokens": 220, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}) as c:
        with c.stream("POST", "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                while not next(lines).startswith("data: "):
                    pass
            during = scrape(http)
            assert during["nanoserve_num_requests_running"] == 1
            assert during["nanoserve_kv_blocks_free"] < during["nanoserve_kv_blocks_total"]
        # Leaving the block closes the connection mid-stream.
    wait_for(lambda: _idle_and_all_blocks_free(http), 15, "the aborted request's blocks to return")
    after = scrape(http)
    assert after["nanoserve_requests_aborted_total"] == before["nanoserve_requests_aborted_total"] + 1
    assert after['nanoserve_requests_finished_total{finished_reason="abort"}'] >= 1
    assert after["nanoserve_generation_tokens_total"] - before["nanoserve_generation_tokens_total"] < 220


def test_non_streaming_client_disconnect_aborts(server, http) -> None:
    wait_for(lambda: _idle_and_all_blocks_free(http), 30, "the server to be idle")
    before = scrape(http)
    # 4 x 220 tokens take the tiny model well over 0.05 s (about 0.15 s at best on a 2-core box).
    body = {"model": server.served_name, "prompt": "Another long story", "max_tokens": 220, "temperature": 0,
            "ignore_eos": True, "n": 4}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(server.url("/v1/completions"), json=body, headers={"Authorization": f"Bearer {server.api_key}"},
                   timeout=httpx.Timeout(30, read=0.05))  # fmt: skip
    wait_for(lambda: _idle_and_all_blocks_free(http), 15, "the abandoned request's blocks to return")
    after = scrape(http)
    assert after["nanoserve_requests_aborted_total"] == before["nanoserve_requests_aborted_total"] + 1
    assert after["nanoserve_generation_tokens_total"] - before["nanoserve_generation_tokens_total"] < 4 * 220


def test_metrics_cover_latency_and_prefix_cache(server, client, http) -> None:
    prompt = "shared prefix " * 20  # > 2 blocks of 16 tokens
    before = scrape(http)
    for _ in range(2):
        client.completions.create(model=server.served_name, prompt=prompt, max_tokens=3, temperature=0)
    m = scrape(http)
    assert m["nanoserve_prefix_cache_hits_tokens_total"] - before["nanoserve_prefix_cache_hits_tokens_total"] >= 32
    assert 0 < m["nanoserve_prefix_cache_hit_rate"] <= 1
    assert m["nanoserve_time_to_first_token_seconds_count"] > before["nanoserve_time_to_first_token_seconds_count"]
    assert m["nanoserve_inter_token_latency_seconds_count"] > before["nanoserve_inter_token_latency_seconds_count"]
    assert m["nanoserve_prompt_tokens_total"] > before["nanoserve_prompt_tokens_total"]
    assert m["nanoserve_engine_healthy"] == 1 and m["nanoserve_kv_blocks_total"] > 0
    for name in ("nanoserve_num_requests_waiting", "nanoserve_kv_cache_usage_ratio", "nanoserve_num_preemptions_total"):
        assert name in m


# ---- bad requests ------------------------------------------------------------------------------------
M = "tiny-qwen3"
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (id, path, json body, status, param, code)
    ("temperature-wrong-type", CMPL, {"model": M, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("max_tokens-wrong-type", CMPL, {"model": M, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("prompt-wrong-type", CMPL, {"model": M, "prompt": {"text": "hi"}}, 400, "prompt", None),
    ("prompt-missing", CMPL, {"model": M}, 400, "prompt", None),
    ("prompt-empty", CMPL, {"model": M, "prompt": ""}, 400, "prompt", None),
    ("max_tokens-negative", CMPL, {"model": M, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("temperature-negative", CMPL, {"model": M, "prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    ("n-zero", CMPL, {"model": M, "prompt": "hi", "n": 0}, 400, "n", None),
    ("top_p-zero", CMPL, {"model": M, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("logprobs-too-many", CMPL, {"model": M, "prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("token-outside-vocab", CMPL, {"model": M, "prompt": [1, 2, 10**6]}, 400, "prompt", None),
    ("prompt-too-long", CMPL, {"model": M, "prompt": [5] * 300}, 400, "prompt", "context_length_exceeded"),
    (
        "max_tokens-cannot-fit",
        CMPL,
        {"model": M, "prompt": "hi", "max_tokens": 1000},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("messages-empty", CHAT, {"model": M, "messages": []}, 400, "messages", None),
    ("messages-wrong-type", CHAT, {"model": M, "messages": "hi"}, 400, "messages", None),
    ("role-unknown", CHAT, {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", None),
    ("chat-temperature-negative", CHAT, {"model": M, "messages": USER, "temperature": -1}, 400, "temperature", None),
    ("prompt_logprobs-too-many", CMPL, {"model": M, "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs", None),
    ("prompt_logprobs-with-stream", CMPL, {"model": M, "prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, None,
     None),
    ("chat-prompt_logprobs-with-stream", CHAT, {"model": M, "messages": USER, "prompt_logprobs": 0, "stream": True},
     400, None, None),
    ("top_logprobs-without-logprobs", CHAT, {"model": M, "messages": USER, "top_logprobs": 2}, 400, None, None),
    (
        "chat-too-long",
        CHAT,
        {"model": M, "messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "chat-max_tokens-cannot-fit",
        CHAT,
        {"model": M, "messages": USER, "max_completion_tokens": 500},
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ("unknown-model-completions", CMPL, {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("unknown-model-chat", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request(server, http, path, body, status, param, code) -> None:
    assert M == server.served_name
    assert_error(http.post(path, json=body), status, param, code)


def test_malformed_bodies(server, http) -> None:
    assert_error(http.post(CMPL, content=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"}), 400)
    assert_error(http.post(CMPL, content=b"\xff\xfe not json"), 400)
    assert_error(http.post(CMPL, content=b""), 400)
    assert_error(http.post(CMPL, content=b"[1, 2]"), 400)
    big = {"model": M, "prompt": "x" * (5 * 2**20)}
    assert_error(http.post(CMPL, json=big), 413, code="request_too_large")


def test_api_key_required(server) -> None:
    body = {"model": server.served_name, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key}):
        assert_error(httpx.post(server.url(CMPL), json=body, headers=headers), 401, code="invalid_api_key")
        assert_error(httpx.get(server.url("/v1/models"), headers=headers), 401)
    # Operational endpoints stay open (health checks and scrapers carry no key).
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/metrics")).status_code == 200


def test_openai_client_sees_typed_errors(server, client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.served_name, prompt="hi", temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)
    bad = openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()


def test_bad_requests_do_not_disturb_a_running_stream(server, client, http) -> None:
    result: dict[str, object] = {}

    def long_stream() -> None:
        text, finish = "", None
        for ch in client.completions.create(model=server.served_name, prompt="Meanwhile", max_tokens=60, temperature=0,
                                            stream=True, extra_body=IGNORE_EOS):  # fmt: skip
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        result.update(text=text, finish=finish)

    expected = client.completions.create(model=server.served_name, prompt="Meanwhile", max_tokens=60, temperature=0,
                                         extra_body=IGNORE_EOS).choices[0].text  # fmt: skip
    t = threading.Thread(target=long_stream)
    t.start()
    for _, path, body, status, _, _ in BAD_REQUESTS:
        assert http.post(path, json=body).status_code == status
    t.join(60)
    assert not t.is_alive()
    assert result == {"text": expected, "finish": "length"}
    assert http.get("/health").status_code == 200
    r = client.completions.create(model=server.served_name, prompt="Still there?", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1
