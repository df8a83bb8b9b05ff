"""Peak anonymous memory while ``nanoserve.LLM(model)`` loads, the memory left after, load time and decode speed.

The load runs in a child process; this one samples the child's ``/proc/PID/status`` every ``--interval``
(50 ms) and reports ``RssAnon`` (heap: what loading really costs), ``RssFile`` (mmap'd safetensors pages, which
the kernel can drop) and ``VmRSS`` (their sum, with shmem). There is no kernel high-water mark of RssAnon alone
(VmHWM counts file pages too), so the peak is the largest sample, plus the child's own reading at the end of
the load; a spike shorter than one interval can be missed.

The child tells this process where it is over a pipe ("imported", "loaded", ...) and waits after loading until
the loaded state has been sampled, so generation's memory is never counted as load's.

The bound checked (the quantized-load issue's): peak RssAnon during load <= final weight bytes + the largest
single tensor in the checkpoint (from the safetensors headers, no data read) + 1 GiB. Final weight bytes:
``--expected-weight-bytes`` if given, else what the child's model runner reports (``weight_bytes()``; see
``loaded_weight_bytes``, the hook to extend when a quantized layout keeps its weights elsewhere).

    python benchmarks/load_memory.py MODEL [--quantization int4] [--max-model-len 2048] [--generate 32]
    python benchmarks/load_memory.py MODEL --kw dtype=bfloat16 --kw enable_prefix_caching=false
    python benchmarks/load_memory.py --command "python -c 'import torch'"   # any command: peak and wall time

Safety on a shared host: the child is killed (reported as refused) when its RssAnon passes ``--kill-above`` or
the host's MemAvailable falls below ``--min-host-available``; ``--address-space-limit`` sets RLIMIT_AS in it.
Only the child process is measured: tensor-parallel workers it spawns are not.

Prints one JSON line on stdout (figures in bytes and seconds); a human summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
EVENT_FD_ENV = "NANOSERVE_LOAD_MEMORY_FD"
STATUS_FIELDS = ("RssAnon", "RssFile", "VmRSS")
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes from ``"123"``, ``"20GiB"``, ``"1.5G"`` (decimal for G/GB, binary for GiB)."""
    m = _SIZE.fullmatch(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r}; use bytes or e.g. 20GiB, 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_status(pid: int | str) -> dict[str, int] | None:
    """RssAnon / RssFile / VmRSS of ``pid`` in bytes; None once the process is gone (or a zombie)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    return out if len(out) == len(STATUS_FIELDS) else None


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def checkpoint_tensor_bytes(model_dir: str | Path) -> dict[str, int]:
    """Bytes of every tensor in ``model_dir``'s safetensors files, read from the headers alone.

    The format: an 8-byte little-endian header length, then a JSON header mapping each name to
    ``{dtype, shape, data_offsets: [begin, end]}``; the data itself is never read."""
    sizes: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                sizes[name] = end - begin
    return sizes


# --------------------------------------------------------------------------------------------------------------
# Child: load, report, wait, generate
# --------------------------------------------------------------------------------------------------------------


def loaded_weight_bytes(llm: Any) -> tuple[int | None, str]:
    """Bytes of the loaded weights and where the figure came from. The hook for quantized layouts: today the
    runner's ``weight_bytes()`` (parameters, tied tensors once, counted before CPU packing); with tensor
    parallelism there is no runner in this process and the answer is None."""
    runner = getattr(llm.engine.executor, "runner", None)
    if runner is None:
        return None, "unavailable (no model runner in this process)"
    if hasattr(runner, "weight_bytes"):
        return int(runner.weight_bytes()), "runner.weight_bytes()"
    seen: set[int] = set()
    total = 0
    for p in runner.model.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            total += p.numel() * p.element_size()
    return total, "sum of runner.model parameters"


def child_main(spec: dict[str, Any]) -> int:
    events = os.fdopen(int(os.environ[EVENT_FD_ENV]), "w", buffering=1)

    def emit(event: str, **kw: Any) -> None:
        events.write(json.dumps({"event": event, "status": read_status("self"), **kw}) + "\n")
        events.flush()

    t0 = time.perf_counter()
    from nanoserve import LLM, SamplingParams

    emit("imported", import_s=time.perf_counter() - t0)
    t1 = time.perf_counter()
    try:
        llm = LLM(spec["model"], **spec["kwargs"])
    except BaseException as exc:  # report any failure (a refusal, an allocation failure) as data
        emit("error", phase="load", error=f"{type(exc).__name__}: {exc}", load_s=time.perf_counter() - t1)
        return 1
    load_s = time.perf_counter() - t1
    weight_bytes, source = loaded_weight_bytes(llm)
    emit("loaded", load_s=load_s, weight_bytes=weight_bytes, weight_bytes_source=source)
    sys.stdin.readline()  # the parent samples the loaded state before anything else allocates

    n = spec["generate"]
    if n > 0:
        try:
            engine = llm.engine
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n)
            # a short prompt of token ids: no tokenizer work in the timed region
            engine.add_request("load-memory", {"prompt_token_ids": list(range(100, 100 + spec["prompt_len"]))}, params)
            start = time.perf_counter()
            step_times: list[float] = []
            token_ids: list[int] = []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        token_ids = list(out.outputs[0].token_ids)
                step_times.append(time.perf_counter())
            # With a short prompt the first step is the whole prefill and samples token 1.
            ttft = step_times[0] - start
            decode_s = step_times[-1] - step_times[0]
            emit("generated", ttft_s=ttft, decode_s=decode_s, num_tokens=len(token_ids), token_ids=token_ids,
                 decode_tok_s=(len(token_ids) - 1) / decode_s if len(token_ids) > 1 and decode_s > 0 else None)  # fmt: skip
        except BaseException as exc:
            emit("error", phase="generate", error=f"{type(exc).__name__}: {exc}")
            return 1
    llm.close()
    emit("done")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent: start, sample, guard
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Samples ``pid`` every ``interval`` s on a thread, tagging each sample with the current ``phase``; kills
    the process when its RssAnon passes ``kill_above`` or the host's MemAvailable falls below ``min_available``."""

    proc: subprocess.Popen
    interval: float
    kill_above: int | None
    min_available: int | None
    phase: str = "startup"
    samples: list[tuple[float, str, dict[str, int]]] = field(default_factory=list)
    killed: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> dict[str, int] | None:
        status = read_status(self.proc.pid)
        if status is not None:
            self.samples.append((time.perf_counter(), self.phase, status))
            if self.killed is None:
                if self.kill_above is not None and status["RssAnon"] > self.kill_above:
                    self._kill(
                        f"RssAnon {status['RssAnon'] / GIB:.2f} GiB > --kill-above {self.kill_above / GIB:.2f} GiB"
                    )
                elif self.min_available is not None and (avail := host_available_bytes()) < self.min_available:
                    self._kill(f"host MemAvailable {avail / GIB:.2f} GiB < --min-host-available "
                               f"{self.min_available / GIB:.2f} GiB")  # fmt: skip
        return status

    def _kill(self, why: str) -> None:
        self.killed = why
        self.proc.kill()  # our own child, by its handle

    def run(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def peak(self, key: str, phases: tuple[str, ...]) -> int | None:
        values = [s[key] for _, phase, s in self.samples if phase in phases]
        return max(values) if values else None


def _limit_address_space(limit: int | None) -> Any:
    if limit is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_child(argv: list[str], args: argparse.Namespace, protocol: bool) -> tuple[int, Sampler, list[dict], float]:
    """Start ``argv``; with ``protocol`` it is our own child mode, talking over a pipe. Returns (rc, sampler,
    events, wall seconds)."""
    env = dict(os.environ)
    read_fd = write_fd = None
    if protocol:
        read_fd, write_fd = os.pipe()
        env[EVENT_FD_ENV] = str(write_fd)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE if protocol else None, stdout=sys.stderr,
        pass_fds=(write_fd,) if protocol else (), preexec_fn=_limit_address_space(args.address_space_limit),
    )  # fmt: skip
    sampler = Sampler(proc, args.interval, args.kill_above, args.min_host_available)
    thread = sampler.start()
    events: list[dict] = []
    if protocol:
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            for line in pipe:
                event = json.loads(line)
                events.append(event)
                if event["event"] == "imported":
                    sampler.phase = "load"
                elif event["event"] == "loaded":
                    sampler.sample()  # the loaded state, before the child is let go
                    sampler.phase = "after_load"
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
        proc.stdin.close()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.stop()
    thread.join()
    return rc, sampler, events, wall


def measure_load(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_model_len": args.max_model_len}
    if args.kv_cache_memory is not None:
        kwargs["kv_cache_memory"] = args.kv_cache_memory
    if args.quantization is not None:
        kwargs["quantization"] = args.quantization  # LLM() refuses it (TypeError) until it exists
    kwargs.update(args.kw)
    spec = {"model": args.model, "kwargs": kwargs, "generate": args.generate, "prompt_len": args.prompt_len}
    rc, sampler, events, wall = run_child([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                          args, protocol=True)  # fmt: skip
    by_name = {e["event"]: e for e in events}
    loaded, generated, error = by_name.get("loaded"), by_name.get("generated"), by_name.get("error")

    load_phases = ("startup", "load")
    peak_anon = sampler.peak("RssAnon", load_phases)
    final = loaded["status"] if loaded else None
    if final is not None:  # the child's own reading at the end of the load counts as a sample too
        peak_anon = max(peak_anon or 0, final["RssAnon"])
    imported = by_name.get("imported")
    tensors = checkpoint_tensor_bytes(args.model)
    largest_name = max(tensors, key=tensors.__getitem__) if tensors else None

    weight_bytes = args.expected_weight_bytes
    weight_source = "--expected-weight-bytes"
    if weight_bytes is None:
        weight_bytes, weight_source = (loaded["weight_bytes"], loaded["weight_bytes_source"]) if loaded else (None, "-")
    bound = None
    if weight_bytes is not None and largest_name is not None:
        bound = weight_bytes + tensors[largest_name] + GIB
    ok = rc == 0 and loaded is not None and sampler.killed is None
    return {
        "model": args.model, "kwargs": kwargs, "ok": ok, "rc": rc,
        "error": _load_error(ok, rc, sampler.killed, error),
        "import_s": imported and imported["import_s"],
        "load_s": loaded["load_s"] if loaded else (error or {}).get("load_s"),
        "wall_s": wall,
        "peak_rss_anon_bytes": peak_anon,
        "final_rss_anon_bytes": final and final["RssAnon"],
        "baseline_rss_anon_bytes": imported and imported["status"]["RssAnon"],  # python + torch + nanoserve
        "peak_rss_file_bytes": sampler.peak("RssFile", load_phases),
        "peak_vm_rss_bytes": sampler.peak("VmRSS", load_phases),
        "final_rss_file_bytes": final and final["RssFile"],
        "final_vm_rss_bytes": final and final["VmRSS"],
        "peak_rss_anon_generate_bytes": sampler.peak("RssAnon", ("after_load",)),
        "decode_tok_s": generated and generated["decode_tok_s"],
        "ttft_s": generated and generated["ttft_s"],
        "generated_token_ids": generated and generated["token_ids"],
        "weight_bytes": weight_bytes, "weight_bytes_source": weight_source,
        "largest_tensor": largest_name, "largest_tensor_bytes": largest_name and tensors[largest_name],
        "checkpoint_tensor_bytes": sum(tensors.values()),
        "bound_bytes": bound,
        "within_bound": None if bound is None or peak_anon is None or not ok else peak_anon <= bound,
        "num_samples": len(sampler.samples), "interval_s": args.interval,
    }  # fmt: skip


def _load_error(ok: bool, rc: int, killed: str | None, error: dict | None) -> str | None:
    if killed:
        return f"killed: {killed}"
    if error:
        return f"{error['phase']}: {error['error']}"
    return None if ok else f"child exited with {rc} (negative: killed by that signal, e.g. the OOM killer's 9)"


def measure_command(args: argparse.Namespace) -> dict[str, Any]:
    rc, sampler, _, wall = run_child(shlex.split(args.command), args, protocol=False)
    phases = ("startup",)
    last = sampler.samples[-1][2] if sampler.samples else None
    return {
        "command": args.command, "ok": rc == 0 and sampler.killed is None, "rc": rc,
        "error": sampler.killed and f"killed: {sampler.killed}",
        "wall_s": wall, "peak_rss_anon_bytes": sampler.peak("RssAnon", phases),
        "last_rss_anon_bytes": last and last["RssAnon"], "peak_rss_file_bytes": sampler.peak("RssFile", phases),
        "peak_vm_rss_bytes": sampler.peak("VmRSS", phases), "num_samples": len(sampler.samples),
        "interval_s": args.interval,
    }  # fmt: skip


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _kw(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--kw wants key=value, got {text!r}")
    try:
        return key, json.loads(value)  # 3, 0.5, true, null, "quoted"
    except json.JSONDecodeError:
        return key, value  # a bare string: bfloat16, 2GiB


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return child_main(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint directory to load with nanoserve.LLM")
    parser.add_argument("--command", help="instead of a model: any command line, sampled for its whole life")
    parser.add_argument("--quantization", default=None, help="passed to LLM(quantization=...) when given")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-memory", default="1GiB",
                        help="LLM(kv_cache_memory=...); a fixed budget keeps the figures independent of the "
                             "host's free memory ('none' = nanoserve's default)")  # fmt: skip
    parser.add_argument(
        "--kw",
        type=_kw,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra LLM(...) keyword (value parsed as JSON when it can be); repeatable",
    )
    parser.add_argument("--generate", type=int, default=0, help="greedy tokens to generate after the load")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt length in token ids (default 16)")
    parser.add_argument(
        "--expected-weight-bytes",
        type=parse_size,
        default=None,
        help="final weight bytes for the bound (default: what the loaded runner reports)",
    )
    parser.add_argument("--interval", type=float, default=0.05, help="sampling interval in s (default 0.05)")
    parser.add_argument("--kill-above", type=parse_size, default=None, help="kill the child above this RssAnon")
    parser.add_argument(
        "--min-host-available",
        type=parse_size,
        default=parse_size("1.5GiB"),
        help="kill the child when host MemAvailable drops below this (default 1.5GiB)",
    )
    parser.add_argument("--address-space-limit", type=parse_size, default=None, help="RLIMIT_AS for the child")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    if (args.model is None) == (args.command is None):
        parser.error("give a MODEL directory or --command, not both")
    if args.kv_cache_memory is not None and args.kv_cache_memory.lower() == "none":
        args.kv_cache_memory = None
    args.kw = dict(args.kw)

    result = measure_command(args) if args.command else measure_load(args)
    if args.command:
        print(f"{'ok' if result['ok'] else 'FAILED'}: wall {result['wall_s']:.1f} s, peak RssAnon "
              f"{_gib(result['peak_rss_anon_bytes'])}", file=sys.stderr)  # fmt: skip
    else:
        r = result
        print(f"{'ok' if r['ok'] else 'FAILED: ' + str(r['error'])}\n"
              f"  load {r['load_s'] or 0:.1f} s; RssAnon: baseline {_gib(r['baseline_rss_anon_bytes'])}, peak during "
              f"load {_gib(r['peak_rss_anon_bytes'])}, after load {_gib(r['final_rss_anon_bytes'])}; peak VmRSS "
              f"{_gib(r['peak_vm_rss_bytes'])}\n"
              f"  bound = weights {_gib(r['weight_bytes'])} + largest tensor {_gib(r['largest_tensor_bytes'])} "
              f"({r['largest_tensor']}) + 1 GiB = {_gib(r['bound_bytes'])}: within bound {r['within_bound']}"
              + (f"\n  decode {r['decode_tok_s']:.2f} tok/s, ttft {r['ttft_s']:.2f} s" if r["decode_tok_s"] else ""),
              file=sys.stderr)  # fmt: skip
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
