"""`nanoserve generate | serve | chat | bench | verify | plan` — each subcommand lives in its own module and is
imported only when used, so `nanoserve --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model

# subcommand -> module providing add_parser(subparsers) and run(args) -> int
_SUBCOMMANDS = {
    "serve": "nanoserve.server.cli",
    "bench": "nanoserve.tools.bench",
    "verify": "nanoserve.tools.verify",
    "plan": "nanoserve.tools.plan",
    "chat": "nanoserve.tools.chat",
}


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate a completion for a prompt and print it",
        description="Generate a completion for each prompt and print it. A sampling flag left out takes the "
                    "default in force: the model's generation_config.json value (see --generation-config), else "
                    "the built-in one (that of SamplingParams). The defaults in force are printed to stderr.",
    )  # fmt: skip
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the model's max_new_tokens, else 16")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--top-k", type=int, default=None, help="0 = no limit (default: the model's, else 0)")
    p.add_argument("--sample-seed", type=int, default=None, help="per-request seed")
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from nanoserve import LLM, SamplingParams

    flags = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens)
    given = {name: value for name, value in flags.items() if value is not None}
    given.update(seed=args.sample_seed, ignore_eos=args.ignore_eos)
    SamplingParams(**given)  # refuse a bad flag before loading the model
    with LLM(resolve_model(args.model), **engine_kwargs(args)) as llm:
        defaults = llm.generation_defaults
        print(f"nanoserve: {defaults.summary()}", file=sys.stderr, flush=True)
        params = defaults.sampling_params(**given)
        outputs = llm.generate(args.prompt, params, use_tqdm=len(args.prompt) > 1)
    for out in outputs:
        if len(outputs) > 1:
            print(f"--- {out.prompt!r}")
        print(out.outputs[0].text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoserve", description="A small, fast, readable LLM inference engine.")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG | INFO | WARNING | ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    for module in _SUBCOMMANDS.values():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
