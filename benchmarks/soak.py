"""Soak test: N minutes of random traffic, with clients that hang up, against a nanoserve server; then check
that nothing was lost or leaked. Not a CI test — run it by hand (10 minutes is the reference run).

Starts ``nanoserve serve`` on 127.0.0.1 (a free port; the demo model unless ``--model``; a small KV cache so
preemption happens) and stops it at the end — or drives a server you started (``--base-url``; give
``--server-pid`` to track its memory). Traffic, ``--concurrency`` clients at once, each request drawn at random:
completions or chat, streamed or not, n=1 or 2, greedy / sampled / seeded, stop strings, logprobs, shared
prompt prefixes (prefix-cache hits) — and, with probability ``--hang-up``, a client that leaves early: a stream
closed after a few events, or a non-streaming request abandoned by a short read timeout. A few requests are
invalid on purpose (they must get a 4xx).

Printed: every ``--report-every`` seconds a progress line; at the end requests served, outcomes and errors by
kind, the server's own counts compared with the clients', KV blocks leaked once idle (must be 0) and the
resident memory of the server and its children over time (psutil). Exit status 1 if any error or leak.

    python benchmarks/soak.py --minutes 10
    python benchmarks/soak.py --minutes 1 --base-url http://127.0.0.1:8000 --server-pid 12345
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches under "
         "bright autumn skies near old harbour towns where fishermen mend nets and children chase gulls").split()  # fmt: skip
# Outcomes a client chose (not errors).
INTENDED = ("served", "hung_up", "gave_up", "rejected_as_expected")
MiB = 2**20


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first message of each error kind
    tokens: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, detail[:500])


# ---- the server ------------------------------------------------------------------------------------------
def start_server(args: argparse.Namespace, log_path: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nanoserve.cli", "serve"]
    if args.model:
        cmd.append(args.model)
    cmd += ["--host", "127.0.0.1", "--port", "0", "--max-num-seqs", str(args.max_num_seqs),
            "--kv-cache-memory", args.kv_cache_memory, "--max-model-len", str(args.max_model_len),
            *(["--max-queued-requests", str(args.max_queued_requests)] if args.max_queued_requests else []),
            *args.server_arg]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    deadline = time.monotonic() + 300
    while True:
        text = open(log_path, errors="replace").read()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", text)
        if m:
            base_url = m.group(1)
            try:
                if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                    return proc, base_url
            except httpx.TransportError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"the server did not start:\n{text}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def scrape(base_url: str) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def rss_of(pid: int) -> int:
    """Resident bytes of ``pid`` and all its children (tensor-parallel workers included)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class MemoryWatch:
    """Samples the server's resident memory every ``interval`` seconds in a thread."""

    def __init__(self, pid: int | None, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.pid is not None and not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, rss_of(self.pid)))
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)

    @property
    def last(self) -> int:
        return self.samples[-1][1] if self.samples else 0


# ---- traffic -------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One request and what its client will do."""

    path: str
    body: dict[str, Any]
    stream: bool
    expect_4xx: bool = False
    hang_up_after: int | None = None  # streamed: close after this many events
    give_up_after: float | None = None  # not streamed: read timeout, then leave


def make_plan(rng: random.Random, args: argparse.Namespace, prefixes: list[str]) -> Plan:
    chat = rng.random() < 0.35
    stream = rng.random() < 0.6
    prompt = (rng.choice(prefixes) if rng.random() < 0.5 else "") + " ".join(
        rng.choice(WORDS) for _ in range(rng.randint(1, 40))
    )
    body: dict[str, Any] = {"max_tokens": rng.randint(1, args.max_tokens), "stream": stream}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice([0.5, 1.0])
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(-(2**40), 2**40)
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    if rng.random() < 0.15:
        body["stop"] = rng.sample(WORDS, 2)
    if rng.random() < 0.15:
        if chat:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        else:
            body["logprobs"] = rng.randint(0, 5)
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    plan = Plan("/v1/chat/completions" if chat else "/v1/completions", body, stream)
    roll = rng.random()
    if roll < args.invalid:
        plan.body = {**body, rng.choice(["temperature", "n", "max_tokens"]): -1}
        plan.expect_4xx = True
    elif roll < args.invalid + args.hang_up:
        if stream:
            plan.hang_up_after = rng.randint(1, 4)
        else:
            plan.give_up_after = rng.uniform(0.05, 1.0)
    return plan


async def run_plan(client: httpx.AsyncClient, plan: Plan, tally: Tally, timeout: float) -> None:
    try:
        if plan.stream:
            await _run_stream(client, plan, tally, timeout)
        else:
            await _run_plain(client, plan, tally, timeout)
    except httpx.TimeoutException as exc:
        tally.error("timeout", f"{type(exc).__name__} after {timeout} s: {json.dumps(plan.body)[:300]}")
    except httpx.TransportError as exc:
        tally.error("transport_error", f"{type(exc).__name__}: {exc}")


def _status_outcome(plan: Plan, status: int, text: str, tally: Tally) -> bool:
    """Account a non-200; returns True if the request ended here."""
    if status == 200:
        if plan.expect_4xx:
            tally.error("invalid_request_accepted", json.dumps(plan.body)[:300])
            return True
        return False
    if 400 <= status < 500 and plan.expect_4xx:
        tally.outcomes["rejected_as_expected"] += 1
    elif status == 503 and "queue_full" in text:
        tally.outcomes["refused_queue_full"] += 1  # allowed by --max-queued-requests; not an error
    elif status >= 500:
        tally.error(f"http_{status}", text)
    else:
        tally.error(f"unexpected_{status}", f"{text} for {json.dumps(plan.body)[:300]}")
    return True


async def _run_plain(client: httpx.AsyncClient, plan: Plan, tally: Tally, timeout: float) -> None:
    if plan.give_up_after is not None:
        try:
            r = await client.post(plan.path, json=plan.body, timeout=httpx.Timeout(timeout, read=plan.give_up_after))
        except httpx.ReadTimeout:
            tally.outcomes["gave_up"] += 1
            return
    else:
        r = await client.post(plan.path, json=plan.body, timeout=timeout)
    if _status_outcome(plan, r.status_code, r.text, tally):
        return
    data = r.json()
    _check_choices(plan, data["choices"], data["usage"]["completion_tokens"], tally)


def _check_choices(plan: Plan, choices: list[dict[str, Any]], completion_tokens: int, tally: Tally) -> None:
    n = plan.body.get("n", 1)
    reasons = [c.get("finish_reason") for c in choices]
    if len(choices) != n or any(r not in ("stop", "length") for r in reasons):
        tally.error("incomplete", f"finish reasons {reasons} for n={n}")
        return
    if plan.body.get("ignore_eos") and not plan.body.get("stop") and completion_tokens != n * plan.body["max_tokens"]:
        tally.error("wrong_token_count", f"{completion_tokens} tokens, asked {n} x {plan.body['max_tokens']}")
        return
    tally.outcomes["served"] += 1
    tally.tokens += completion_tokens


async def _run_stream(client: httpx.AsyncClient, plan: Plan, tally: Tally, timeout: float) -> None:
    n = plan.body.get("n", 1)
    finish: dict[int, str | None] = {}
    usage = None
    events = 0
    done = False
    async with client.stream("POST", plan.path, json=plan.body, timeout=timeout) as r:
        if r.status_code != 200:
            await r.aread()
            _status_outcome(plan, r.status_code, r.text, tally)
            return
        if plan.expect_4xx:
            tally.error("invalid_request_accepted", json.dumps(plan.body)[:300])
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                tally.error("stream_error_event", json.dumps(event["error"]))
                return
            events += 1
            for c in event["choices"]:
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
            usage = event.get("usage") or usage
            if plan.hang_up_after is not None and events >= plan.hang_up_after:
                tally.outcomes["hung_up"] += 1
                return  # leaving the block closes the connection mid-stream
    if not done or len(finish) != n:
        tally.error("incomplete", f"stream ended (done={done}) with finish reasons {finish} for n={n}")
        return
    if usage is not None:
        _check_choices(plan, [{"finish_reason": finish[i]} for i in range(n)], usage["completion_tokens"], tally)
    else:
        tally.outcomes["served"] += 1


async def traffic(args: argparse.Namespace, base_url: str, tally: Tally, mem: MemoryWatch) -> None:
    rng = random.Random(args.seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(60)) + " " for _ in range(4)]
    deadline = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def worker(i: int) -> None:
        wrng = random.Random(f"{args.seed}-{i}")
        async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as client:
            while time.monotonic() < deadline:
                await run_plan(client, make_plan(wrng, args, prefixes), tally, args.request_timeout)

    async def reporter() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(args.report_every, max(0.0, deadline - time.monotonic())))
            m = await asyncio.to_thread(scrape, base_url)
            elapsed = time.monotonic() - t0
            print(f"[{elapsed:6.0f} s] served {tally.outcomes['served']:6d}  hung up {tally.outcomes['hung_up']:5d}  "
                  f"gave up {tally.outcomes['gave_up']:5d}  errors {sum(tally.errors.values()):3d}  "
                  f"running {m['nanoserve_num_requests_running']:3.0f}  waiting {m['nanoserve_num_requests_waiting']:3.0f}  "
                  f"kv {m['nanoserve_kv_cache_usage_ratio']:4.0%}  preemptions {m['nanoserve_num_preemptions_total']:6.0f}  "
                  f"rss {mem.last / MiB:6.0f} MiB (peak {mem.peak / MiB:.0f})", flush=True)  # fmt: skip

    await asyncio.gather(reporter(), *(worker(i) for i in range(args.concurrency)))


# ---- the run -------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to send traffic (default: 10)")
    p.add_argument("--base-url", help="drive this server instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --base-url: the server's PID, to sample its memory")
    p.add_argument("--api-key", default=None, help="with --base-url: the server's API key")
    p.add_argument("--model", default=None, help="model for the started server (default: the demo model)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="started server (default: 16)")
    p.add_argument("--kv-cache-memory", default="16MiB",
                   help="started server; small so the cache runs full and preempts (default: 16MiB)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=512, help="started server (default: 512)")
    p.add_argument("--max-queued-requests", type=int, default=None, help="started server (default: no bound)")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    p.add_argument("--concurrency", type=int, default=32, help="clients at once (default: 32)")
    p.add_argument("--max-tokens", type=int, default=96, help="largest max_tokens drawn (default: 96)")
    p.add_argument("--hang-up", type=float, default=0.2, help="share of clients that leave early (default: 0.2)")
    p.add_argument("--invalid", type=float, default=0.03, help="share of invalid requests (default: 0.03)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="a request slower than this is an error")
    p.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    proc = None
    log_dir = tempfile.mkdtemp(prefix="nanoserve-soak-")
    log_path = os.path.join(log_dir, "server.log")
    if args.base_url:
        base_url, pid = args.base_url.rstrip("/"), args.server_pid
    else:
        proc, base_url = start_server(args, log_path)
        pid = proc.pid
        print(f"server pid {pid} at {base_url}; log {log_path}", flush=True)
    mem = MemoryWatch(pid)
    mem.start()
    tally = Tally()
    failed = False
    try:
        before = scrape(base_url)
        rss_start = rss_of(pid) if pid else 0
        t0 = time.monotonic()
        asyncio.run(traffic(args, base_url, tally, mem))
        elapsed = time.monotonic() - t0
        # Idle: every request the clients left is aborted, every block back in the free queue.
        idle_deadline = time.monotonic() + 120
        while True:
            after = scrape(base_url)
            idle = all(after[k] == 0 for k in ("nanoserve_num_requests_running", "nanoserve_num_requests_waiting",
                                               "nanoserve_num_requests_in_flight"))  # fmt: skip
            if (idle and after["nanoserve_kv_blocks_free"] == after["nanoserve_kv_blocks_total"]) or (
                time.monotonic() > idle_deadline
            ):
                break
            time.sleep(0.5)
        leaked = after["nanoserve_kv_blocks_total"] - after["nanoserve_kv_blocks_free"]
        healthy = httpx.get(base_url + "/health", timeout=10).status_code == 200
        time.sleep(2 * mem.interval)
        mem.stop()
        failed = report(args, tally, before, after, leaked, idle, healthy, elapsed, rss_start, mem)
    finally:
        mem.stop()
        if proc is not None:
            code = stop_server(proc)
            log = open(log_path, errors="replace").read()
            print(f"server stopped (exit {code}); tracebacks in its log: {log.count('Traceback')}")
            failed = failed or "Traceback" in log or code not in (0, -signal.SIGTERM)
    return 1 if failed else 0


def report(
    args: argparse.Namespace, tally: Tally, before: dict[str, float], after: dict[str, float], leaked: float,
    idle: bool, healthy: bool, elapsed: float, rss_start: int, mem: MemoryWatch,
) -> bool:  # fmt: skip
    """Print the summary; True if the run failed."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    total = sum(tally.outcomes.values()) + sum(tally.errors.values())
    print(f"\n=== soak: {elapsed / 60:.1f} min, {args.concurrency} clients, {total} requests ===")
    print(f"requests served:     {tally.outcomes['served']} ({tally.outcomes['served'] / elapsed:.1f}/s, "
          f"{tally.tokens / elapsed:.0f} completion tokens/s)")  # fmt: skip
    for kind in ("hung_up", "gave_up", "rejected_as_expected", "refused_queue_full"):
        print(f"  {kind + ':':20s} {tally.outcomes[kind]}")
    print(f"errors:              {sum(tally.errors.values())}")
    for kind, count in tally.errors.most_common():
        print(f"  {kind}: {count}   e.g. {tally.examples[kind]}")
    reasons = {
        r: delta(f'nanoserve_requests_finished_total{{finished_reason="{r}"}}') for r in ("stop", "length", "abort")
    }
    print(f"server counts:       finished {reasons}, aborted {delta('nanoserve_requests_aborted_total'):.0f}, "
          f"preemptions {delta('nanoserve_num_preemptions_total'):.0f}, "
          f"prefix-cache hit rate {after['nanoserve_prefix_cache_hit_rate']:.0%}")  # fmt: skip
    # Every request the server accepted ended exactly once, as finished or aborted; the clients saw each of those
    # as served, hung up or gave up (a client that hangs up after the last token leaves a finished request).
    accepted_by_server = sum(reasons.values())
    accepted_by_clients = sum(tally.outcomes[k] for k in ("served", "hung_up", "gave_up")) + sum(tally.errors.values())
    balanced = accepted_by_server == accepted_by_clients
    print(f"accounting:          server ended {accepted_by_server:.0f} requests, clients sent {accepted_by_clients} "
          f"that were accepted: {'equal' if balanced else 'MISMATCH'}")  # fmt: skip
    print(f"idle afterwards:     {idle} (running/waiting/in-flight all 0), /health 200: {healthy}")
    print(f"KV blocks leaked:    {leaked:.0f} of {after['nanoserve_kv_blocks_total']:.0f}")
    if mem.samples:
        print(f"resident memory (server + children): start {rss_start / MiB:.0f} MiB, peak {mem.peak / MiB:.0f} MiB, "
              f"end {mem.last / MiB:.0f} MiB")  # fmt: skip
        step = max(1, len(mem.samples) // 10)
        row = [f"{t / 60:4.1f} min {b / MiB:5.0f}" for t, b in mem.samples[::step]]
        print("  over time (MiB):  " + " | ".join(row))
    return bool(tally.errors) or leaked != 0 or not idle or not healthy or not balanced


if __name__ == "__main__":
    sys.exit(main())
