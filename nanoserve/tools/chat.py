"""``nanoserve chat [MODEL]``: an interactive chat in the terminal, on the built-in demo model or a checkpoint.

Each turn renders the whole history through the model's chat template and streams the reply as it is
generated. ``/reset`` clears the history, ``/exit`` (or Ctrl-D) leaves; Ctrl-C stops the reply being written
(what was written stays in the history) without leaving. Ctrl-C is caught as a flag and acted on between engine
steps, so a step is never cut in half: the request is aborted the ordinary way and its KV blocks come back.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from nanoserve.engine_args import add_engine_args, engine_kwargs, resolve_model

HELP = "/reset clears the history, /exit leaves; Ctrl-C stops a reply"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_engine_args(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default: 512)")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's, else 1.0")
    p.add_argument("--ignore-eos", action="store_true", help="keep writing past EOS, up to --max-tokens")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='passed to the chat template, e.g. \'{"enable_thinking": false}\'')  # fmt: skip
    p.set_defaults(run=run)


class _Interrupt:
    """Ctrl-C while a reply streams: remembered, acted on between steps."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed = True


def stream_reply(llm: Any, prompt_text: str, params: Any, request_id: str, out: Any = sys.stdout) -> tuple[str, bool]:
    """Generate one reply, writing its text to ``out`` as it comes; returns (text, interrupted)."""
    engine = llm.engine
    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)  # before anything is queued: no Ctrl-C lands mid-way
    pieces: list[str] = []
    try:
        out.write("assistant> ")
        out.flush()
        ids = engine.tokenizer.encode(prompt_text, add_special_tokens=False)
        engine.add_request(request_id, {"prompt": prompt_text, "prompt_token_ids": ids}, params)
        while engine.has_unfinished_requests():
            if interrupt.pressed:
                engine.abort_request(request_id)
                break
            for output in engine.step():
                text = output.outputs[0].text
                pieces.append(text)
                out.write(text)
                out.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    return "".join(pieces), interrupt.pressed


def run(args: argparse.Namespace) -> int:
    import json

    from nanoserve import LLM
    from nanoserve.sampling_params import RequestOutputKind

    template_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    if not isinstance(template_kwargs, dict):
        raise ValueError("--chat-template-kwargs must be a JSON object")
    with LLM(resolve_model(args.model), **engine_kwargs(args)) as llm:
        tokenizer = llm.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            print("error: this model's tokenizer has no chat template, so there is no way to format a conversation "
                  "for it; use `nanoserve generate --prompt ...` instead", file=sys.stderr)  # fmt: skip
            return 2
        overrides = dict(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, output_kind=RequestOutputKind.DELTA)
        if args.temperature is not None:
            overrides["temperature"] = args.temperature
        params = llm.generation_defaults.sampling_params(**overrides)
        opening = [{"role": "system", "content": args.system}] if args.system else []
        history = list(opening)
        print(f"nanoserve chat: {HELP}", flush=True)
        turn = 0
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                print()
                continue
            command = line.strip()
            if command == "/exit":
                break
            if command == "/reset":
                history = list(opening)
                print("(history cleared)", flush=True)
                continue
            if not command:
                continue
            history.append({"role": "user", "content": line})
            prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False, **template_kwargs)
            reply, interrupted = stream_reply(llm, prompt, params, f"chat-{turn}")
            turn += 1
            print(" [stopped]" if interrupted else "", flush=True)
            history.append({"role": "assistant", "content": reply})
    return 0
