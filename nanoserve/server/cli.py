"""``nanoserve serve [MODEL]``: load the engine, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model
from nanoserve.server.reasoning import REASONING_PARSERS
from nanoserve.server.tool_parsers import TOOL_PARSERS

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Serve a model over an OpenAI-compatible HTTP API with continuous batching: requests join the running batch
as they arrive and stream their tokens back. Sampling settings a request leaves unset (temperature, top_p,
top_k, min_p, repetition_penalty, max_tokens) take the model's generation_config.json values, as in vLLM;
--generation-config vllm ignores that file.

endpoints:
  POST /v1/completions        prompt(s) as text or token ids; stream, n, stop, logprobs, echo, seed, ...
  POST /v1/chat/completions   messages rendered with the tokenizer's chat template
  GET  /v1/models             the served model name(s) and their default sampling params
  GET  /health                200 while the engine runs, 503 after it failed
  GET  /metrics               Prometheus metrics (batch sizes, KV-cache usage, TTFT, inter-token latency, ...)
  POST /tokenize, /detokenize

example:
  nanoserve serve --port 8000            # the built-in demo model
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "nanoserve-demo-qwen3", "prompt": "Hello", "max_tokens": 16}'
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    g.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 picks a free one and prints it (default: 8000)"
    )
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients use in the 'model' field; others get 404 (default: the model argument, "
                        "or nanoserve-demo-qwen3 for the demo model)")  # fmt: skip
    g.add_argument(
        "--api-key",
        default=os.environ.get("NANOSERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSERVE_API_KEY, else no key)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="most requests waiting to be scheduled; beyond it new requests get 503 (default: no limit)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 2**20,
        help="largest request body accepted; larger ones get 413 (default: 4 MiB)",
    )
    g.add_argument(
        "--request-body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds a client has to send its whole request body once its headers are in; a stalled or "
        "trickling body gets 408 and its connection is closed (default: 30)",
    )
    g.add_argument("--shutdown-timeout", type=float, default=None,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before cancelling them "
                        "(default: wait for all)")  # fmt: skip
    g.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's log level (default: warning)")
    c = p.add_argument_group("chat")
    c.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the tokenizer's own")  # fmt: skip
    c.add_argument("--reasoning-parser", default=None, choices=tuple(REASONING_PARSERS),
                   help="split each reply's <think>...</think> into message.reasoning (and reasoning_content, for "
                        "older clients): qwen3 (when the reply opens with <think>), deepseek_r1 (the template "
                        "opens it)")  # fmt: skip
    c.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model decide when to call tools (tool_choice "auto", the default when a request '
                        "has tools); needs --tool-call-parser")  # fmt: skip
    c.add_argument("--tool-call-parser", default=None, choices=tuple(TOOL_PARSERS),
                   help="how tool calls are read from replies: hermes (Qwen2.5/Qwen3), llama3_json, mistral")
    s = p.add_argument_group("structured outputs")
    s.add_argument("--structured-outputs-disable-any-whitespace", action="store_true",
                   help="constrained JSON without free whitespace for every request that does not set "
                        "structured_outputs.disable_any_whitespace itself (vLLM's disable_any_whitespace)")  # fmt: skip
    s.add_argument("--structured-outputs-config", default=None, metavar="JSON",
                   help="vLLM's spelling, e.g. '{\"disable_any_whitespace\": true}'; keys: "
                        f"{', '.join(STRUCTURED_OUTPUTS_CONFIG_KEYS)}")  # fmt: skip
    p.set_defaults(run=run_serve)


# Keys of --structured-outputs-config nanoserve reads; "backend" may only name the one nanoserve has.
STRUCTURED_OUTPUTS_CONFIG_KEYS = ("disable_any_whitespace", "backend")


def disable_any_whitespace(args: argparse.Namespace) -> bool:
    """The server-wide compact-JSON default from either spelling; a bad --structured-outputs-config is refused."""
    on = bool(args.structured_outputs_disable_any_whitespace)
    if args.structured_outputs_config is None:
        return on
    try:
        config = json.loads(args.structured_outputs_config)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--structured-outputs-config: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError("--structured-outputs-config: must be a JSON object, e.g. '{\"disable_any_whitespace\": true}'")
    unknown = sorted(set(config) - set(STRUCTURED_OUTPUTS_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"--structured-outputs-config: unsupported key(s) {', '.join(unknown)}; supported: "
            f"{', '.join(STRUCTURED_OUTPUTS_CONFIG_KEYS)}"
        )
    value = config.get("disable_any_whitespace", False)
    if not isinstance(value, bool):
        raise ValueError(f"--structured-outputs-config: disable_any_whitespace must be true or false, got {value!r}")
    from nanoserve.engine.structured_output import GRAMMAR_BACKEND

    backend = config.get("backend", "auto")
    if backend not in ("auto", GRAMMAR_BACKEND):
        raise ValueError(f"--structured-outputs-config: backend {backend!r} is not available; nanoserve uses {GRAMMAR_BACKEND!r} (or 'auto')")
    return on or value


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 lets the OS choose a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from nanoserve.config import EngineConfig
    from nanoserve.engine.async_engine import AsyncLLMEngine
    from nanoserve.engine.llm_engine import LLMEngine, load_tokenizer
    from nanoserve.generation_defaults import resolve_generation_defaults
    from nanoserve.server.app import build_app
    from nanoserve.server.metrics import ServerMetrics
    from nanoserve.server.serving import ServerSettings
    from nanoserve.tools.demo import DEMO_MODEL_NAME

    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.max_request_bytes < 1024:
        raise ValueError(f"--max-request-bytes must be at least 1024, got {args.max_request_bytes}")
    if not args.request_body_timeout > 0:  # also refuses nan
        raise ValueError(f"--request-body-timeout must be > 0 seconds, got {args.request_body_timeout}")
    compact_json = disable_any_whitespace(args)
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)")
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = Path(args.chat_template).read_text()
        except OSError as exc:
            raise ValueError(f"--chat-template: cannot read {args.chat_template!r}: {exc}") from None
    model = resolve_model(args.model)
    names = tuple(args.served_model_name or [DEMO_MODEL_NAME if args.model is None else args.model])
    config = EngineConfig.create(model, **engine_kwargs(args))
    generation_defaults = resolve_generation_defaults(config)  # before loading: a bad file fails fast
    sock = bind_socket(args.host, args.port)  # before loading: a taken port fails fast
    async_engine = None
    try:
        metrics = ServerMetrics()
        async_engine = AsyncLLMEngine(LLMEngine(config), args.max_queued_requests, observer=metrics)
        settings = ServerSettings(served_model_names=names, model_path=config.model, api_key=args.api_key,
                                  max_request_bytes=args.max_request_bytes, disable_any_whitespace=compact_json,
                                  reasoning_parser=args.reasoning_parser, chat_template=chat_template,
                                  tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None)  # fmt: skip
        app = build_app(async_engine, load_tokenizer(config.tokenizer), settings, metrics,
                        body_timeout_s=args.request_body_timeout, generation_defaults=generation_defaults)  # fmt: skip
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"nanoserve: {generation_defaults.summary()}", flush=True)
        print(f"nanoserve: serving {names[0]} on http://{shown}:{port} (Ctrl-C to stop)", flush=True)
        server = uvicorn.Server(uvicorn.Config(
            app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=args.shutdown_timeout,
        ))  # fmt: skip
        # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests finish, then runs the
        # lifespan shutdown, which stops the engine.
        server.run(sockets=[sock])
    finally:
        if async_engine is not None:
            async_engine.shutdown()  # a no-op after the lifespan did it; needed if uvicorn failed to start
        sock.close()
    return 0


if __name__ == "__main__":
    from nanoserve.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
