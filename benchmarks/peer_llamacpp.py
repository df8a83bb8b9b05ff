"""llama.cpp as a peer: build it from a source tree, convert a Hugging Face checkpoint to GGUF, run ``llama-bench``.

    python benchmarks/peer_llamacpp.py convert --llama-cpp SRC --model DIR [--types f32,q8_0,q4_0] [--convert-python PY]
    python benchmarks/peer_llamacpp.py bench --llama-cpp SRC --gguf FILE [-t 2] [-r 5]
    python benchmarks/peer_llamacpp.py run --llama-cpp SRC --model DIR [-r 1]      # both, a line per type

* Build: ``SRC/build/bin/llama-bench`` and ``llama-quantize``; configured and built (Release, ``-DLLAMA_CURL=OFF``,
  ``GGML_NATIVE=ON``: this CPU's instruction sets, less AMX on x86, see ``ensure_built``) only where one is
  missing. A tree built before with AMX crashes on Q8_0 / Q4_0 on a CPU that has it: reconfigure it.
* Convert: ``convert_hf_to_gguf.py --outtype`` for the converter's own types (f32, f16, bf16, q8_0), then
  ``llama-quantize F32.gguf OUT.gguf TYPE`` for the rest (q4_0, q4_k_m, ...; llama.cpp's default recipe, so a
  tied embedding / output tensor may get a wider type than TYPE: ``tensor_types`` in the result lists them;
  ``q4_0-pure`` quantizes every matrix to Q4_0, ``llama-quantize --pure``). The converter runs under
  ``--convert-python`` (a venv with torch, transformers, safetensors, numpy, sentencepiece; gguf-py comes from
  SRC itself). Files land in ``<checkpoint>.gguf/`` beside the checkpoint (or ``--cache-dir``), named by a key
  of the source tree and the checkpoint's files, so a rerun skips the work.
* Bench: two ``llama-bench`` invocations, so each figure is the workload nanoserve's batch-1 latency bench runs:
  ``-p 128 -n 0 -d 0``: prefill of a 128-token prompt into an empty context (pp128);
  ``-p 0 -n 128 -d 128``: 128 decode steps after a 128-token context (tg128 @ d128; the context grows to 256).
  One invocation of ``-p 128 -n 128 -d 128`` would time both at depth 128, i.e. its prefill is the second
  128-token chunk of a prompt, not a prompt. llama-bench warms up once, then times ``-r`` repetitions.
  What differs from nanoserve's run: llama.cpp's defaults stand (KV cache f16, flash attention "auto", weights
  repacked for the CPU's SIMD where a type has such a layout), and its decode computes logits but samples
  nothing (the next token is random).

Plain standard library (and runs under any python): ``compare.py`` imports it, and the converter's venv runs
this file as the converter's launcher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# Output types the converter writes itself; any other type is llama-quantize's, made from the f32 file.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# Pre-tokenizer name written when the converter does not know the tokenizer (see _convert_shim).
DEFAULT_PRE_TOKENIZER = "default"
_REFUSAL = "BPE pre-tokenizer was not recognized"


# ---------------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------------


def ensure_built(src: Path, jobs: int = 2) -> Path:
    """The ``bin`` folder of ``src``'s build with ``llama-bench`` and ``llama-quantize``, building what is missing."""
    src = Path(src).resolve()
    build = src / "build"
    bin_dir = build / "bin"
    targets = ("llama-bench", "llama-quantize")
    if all((bin_dir / t).is_file() for t in targets):
        return bin_dir
    if not (src / "CMakeLists.txt").is_file():
        raise FileNotFoundError(f"{src} is not a llama.cpp source tree (no CMakeLists.txt)")
    if not (build / "CMakeCache.txt").is_file():
        flags = ["-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
        if platform.machine().lower() in ("x86_64", "amd64"):
            # -march=native turns on AMX where the CPU has it, and ggml's AMX matmul then faults on its first
            # tile-config load (Sapphire Rapids VM, 2026-12-01: SIGILL/SIGSEGV in ggml_backend_amx_mul_mat for
            # Q8_0 and Q4_0; llama.cpp issue #20824, open PR #26954: the config is built on the stack and
            # optimised away). GCC lets an explicit -mno-* win over -march=native, whatever the order (checked: 12).
            no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *targets],
                   check=True)  # fmt: skip
    return bin_dir


# ---------------------------------------------------------------------------------------------------------
# Convert
# ---------------------------------------------------------------------------------------------------------


def _convert_shim(src: Path, converter_args: list[str]) -> None:
    """Run ``src/convert_hf_to_gguf.py`` in this process with its unknown-pre-tokenizer refusal turned into a default.

    The converter identifies a BPE tokenizer's pre-tokenizer (the regex split before merges) by hashing how it
    encodes a fixed text, and refuses hashes it has no name for. The benchmark checkpoints' tokenizer is built
    offline, so its hash is unknown. llama-bench feeds token ids and never tokenizes, so any name llama.cpp
    accepts will do: the refusal becomes ``DEFAULT_PRE_TOKENIZER``. The vendored tree is left untouched:
    the package layout (``conversion/base.py``) is patched in memory, the older single-file layout is run from
    patched source text.
    """
    script = src / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *converter_args]
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    if (src / "conversion" / "base.py").is_file():
        from conversion.base import TextModel  # type: ignore[import-not-found]

        original = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError as e:
                if _REFUSAL not in str(e):
                    raise
                return DEFAULT_PRE_TOKENIZER

        TextModel.get_vocab_base_pre = get_vocab_base_pre
        runpy.run_path(str(script), run_name="__main__")
        return
    text = script.read_text()
    refusal = f'raise NotImplementedError("{_REFUSAL} - update get_vocab_base_pre()")'
    if refusal not in text:
        raise RuntimeError(f"{script}: the pre-tokenizer refusal is not where this shim expects it; update the shim")
    code = compile(text.replace(refusal, f"res = {DEFAULT_PRE_TOKENIZER!r}"), str(script), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(script)})


def _check(cmd: list[str], what: str) -> None:
    """Run a tool quietly (the converter logs every tensor); on failure raise with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr + proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")


def _cache_key(src: Path, model: Path) -> str:
    """Changes when the source tree moves or its converter changes, or when any file of the checkpoint does."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for p in [src / "convert_hf_to_gguf.py", *sorted(model.iterdir())]:
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:8]


def convert(src: Path, model: Path, types: list[str], convert_python: str = sys.executable,
            cache_dir: Path | None = None, jobs: int = 2) -> dict[str, Path]:  # fmt: skip
    """GGUF files of ``model`` for each type (``f32``, ``q8_0``, ``q4_0``, ...), made once and reused."""
    src, model = Path(src).resolve(), Path(model).resolve()
    out_dir = Path(cache_dir) if cache_dir else model.parent / f"{model.name}.gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(src, model)
    files = {t: out_dir / f"{t}-{key}.gguf" for t in types}
    f32 = files.get("f32", out_dir / f"f32-{key}.gguf")  # llama-quantize's input, kept even if not asked for
    direct = [t for t in types if t in CONVERTER_TYPES]
    if any(t not in CONVERTER_TYPES for t in types) and "f32" not in direct:
        direct.insert(0, "f32")
    for t in direct:
        out = files.get(t, f32)
        if out.is_file():
            continue
        # Write beside, rename when complete: an interrupted run never leaves a file a rerun would trust.
        part = out.with_suffix(".part")
        cmd = [convert_python, str(Path(__file__).resolve()), "_convert-shim", str(src), "--",
               str(model), "--outtype", t, "--outfile", str(part)]  # fmt: skip
        _check(cmd, f"convert_hf_to_gguf.py --outtype {t} (under {convert_python})")
        part.rename(out)
    for t in types:
        if t in CONVERTER_TYPES or files[t].is_file():
            continue
        bin_dir = ensure_built(src, jobs)
        part = files[t].with_suffix(".part")
        # TYPE-pure: every tensor TYPE (--pure); plain TYPE: llama.cpp's recipe, which widens the output
        # tensor (for a tied model the embedding) to Q6_K for the 4- and 5-bit types.
        base, pure = (t.removesuffix("-pure"), ["--pure"]) if t.endswith("-pure") else (t, [])
        _check([str(bin_dir / "llama-quantize"), *pure, str(f32), str(part), base.upper()], f"llama-quantize {t}")
        part.rename(files[t])
    return files


def tensor_types(gguf_file: Path, src: Path, python: str = sys.executable) -> dict[str, int]:
    """How many tensors of each ggml type the file holds (read with the tree's own gguf-py)."""
    code = (
        "import sys, collections; sys.path.insert(0, sys.argv[1]); from gguf import GGUFReader; "
        "r = GGUFReader(sys.argv[2]); print(dict(collections.Counter(t.tensor_type.name for t in r.tensors)))"
    )
    out = subprocess.run([python, "-c", code, str(Path(src) / "gguf-py"), str(gguf_file)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    import ast

    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Bench
# ---------------------------------------------------------------------------------------------------------


def llama_bench(bin_dir: Path, gguf_file: Path, extra: list[str], threads: int = 2, reps: int = 5) -> list[dict]:
    """One ``llama-bench -o json`` invocation; its list of test records."""
    cmd = [str(Path(bin_dir) / "llama-bench"), "-m", str(gguf_file), "-t", str(threads), "-r", str(reps),
           "-o", "json", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        how = f"died of {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exited {proc.returncode}"
        raise RuntimeError(f"llama-bench {how}: {tail}")
    return json.loads(proc.stdout)


def bench(src: Path, gguf_file: Path, threads: int = 2, reps: int = 5, n: int = 128) -> dict[str, Any]:
    """Prefill tok/s of an ``n``-token prompt from an empty context and decode tok/s of ``n`` tokens after an
    ``n``-token context, as a result record shaped like the other peers' (``figures``, ``memory``, ``settings``)."""
    bin_dir = ensure_built(src)
    (pp,) = llama_bench(bin_dir, gguf_file, ["-p", str(n), "-n", "0", "-d", "0"], threads, reps)
    (tg,) = llama_bench(bin_dir, gguf_file, ["-p", "0", "-n", str(n), "-d", str(n)], threads, reps)
    assert (pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == (n, 0, 0), pp
    assert (tg["n_prompt"], tg["n_gen"], tg["n_depth"]) == (0, n, n), tg
    # ru_maxrss: the largest peak of any finished child (KiB on Linux), i.e. of the two llama-bench processes.
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    file_bytes = Path(gguf_file).stat().st_size
    try:  # gguf-py needs only numpy, which this python may lack
        types = tensor_types(gguf_file, src)
    except (subprocess.CalledProcessError, OSError, ValueError, SyntaxError):
        types = None
    return {
        "kind": "latency", "engine": "llama.cpp", "model": str(gguf_file), "elapsed_s": n / tg["avg_ts"],
        "num_requests": 1, "prompt_tokens": n, "output_tokens": n,
        "figures": {
            "prefill_tokens_per_s": pp["avg_ts"], "prefill_stddev": pp["stddev_ts"],
            "decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
        },
        # Bytes read per decode token: the whole file. Both benchmark shapes tie the embedding to the LM head,
        # so the one large tensor read a row at a time as an embedding is read whole as the head; metadata and
        # vocabulary are a few hundred KB of it. model_size is llama-bench's count of tensor bytes.
        "memory": {"peak_rss_bytes": rss, "weight_bytes": file_bytes, "model_size": tg["model_size"]},
        "settings": {
            "type": tg["model_type"], "threads": tg["n_threads"], "reps": reps, "n_batch": tg["n_batch"],
            "n_ubatch": tg["n_ubatch"], "flash_attn": tg.get("flash_attn"), "type_k": tg.get("type_k"),
            "cpu_info": tg.get("cpu_info"), "backends": tg.get("backends"),
            "build_commit": tg.get("build_commit"), "build_number": tg.get("build_number"),
            "tests": [f"pp{n} @ d0", f"tg{n} @ d{n}"], "tensor_types": types,
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_convert-shim":  # SRC -- converter args (run by convert())
        rest = sys.argv[3:]
        _convert_shim(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("convert", "bench", "run"):
        p = sub.add_parser(name)
        p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree")
        p.add_argument("--jobs", type=int, default=2, help="parallel build jobs, if it must be built")
        if name in ("convert", "run"):
            p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint folder")
            p.add_argument("--types", default="f32,q8_0,q4_0")
            p.add_argument("--convert-python", default=sys.executable, help="python of the converter's venv")
            p.add_argument("--cache-dir", type=Path, default=None, help="where the GGUF files go")
        if name in ("bench", "run"):
            p.add_argument("-t", "--threads", type=int, default=2)
            p.add_argument("-r", "--reps", type=int, default=5)
        if name == "bench":
            p.add_argument("--gguf", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "bench":
        ensure_built(args.llama_cpp, args.jobs)
        result = bench(args.llama_cpp, args.gguf, args.threads, args.reps)
        print("BENCH_JSON " + json.dumps(result), flush=True)
        return
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    files = convert(args.llama_cpp, args.model, types, args.convert_python, args.cache_dir, args.jobs)
    if args.cmd == "convert":
        print("BENCH_JSON " + json.dumps({t: str(f) for t, f in files.items()}), flush=True)
        return
    ensure_built(args.llama_cpp, args.jobs)
    for t, f in files.items():
        # One child per type, so each peak RSS is that model's (RUSAGE_CHILDREN keeps the largest so far).
        proc = subprocess.run([sys.executable, __file__, "bench", "--llama-cpp", str(args.llama_cpp), "--gguf", str(f),
                               "-t", str(args.threads), "-r", str(args.reps)], capture_output=True, text=True)  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
        if proc.returncode or not lines:
            print(f"{t:6s} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1][len("BENCH_JSON ") :])
        fig = r["figures"]
        print(f"{t:6s} {os.path.getsize(f) / 1e6:8.1f} MB  decode {fig['decode_tokens_per_s']:8.1f} tok/s  "
              f"prefill {fig['prefill_tokens_per_s']:8.1f} tok/s  {tensor_types(f, args.llama_cpp, args.convert_python)}")  # fmt: skip


if __name__ == "__main__":
    main()
