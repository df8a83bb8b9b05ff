"""``nanoserve chat`` driven through a pseudo-terminal: two turns, a reset, Ctrl-C in the middle of a reply
(the chat goes on), and /exit; and the message for a model without a chat template."""

from __future__ import annotations

import json
import pathlib
import sys

import pexpect
import pytest

from nanoserve.testing.checkpoints import build_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_checkpoint(tmp_path_factory.mktemp("chat_cli") / "m", arch="qwen3", max_position_embeddings=2048, seed=61)


def _spawn(model: pathlib.Path, *extra: str) -> pexpect.spawn:
    args = ["-m", "nanoserve.cli", "chat", str(model), "--kv-cache-memory", "16MiB", "--max-model-len", "2048", *extra]
    return pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, dimensions=(40, 200))


def test_two_turns_reset_interrupt_and_exit(model: pathlib.Path) -> None:
    # Replies long enough to interrupt: EOS ignored, 1,500 tokens each (seconds on this model).
    child = _spawn(model, "--ignore-eos", "--max-tokens", "1500", "--temperature", "1.0")
    try:
        child.expect("nanoserve chat:")
        child.expect("you> ")
        child.sendline("hello there")
        child.expect("assistant> ")
        child.expect("you> ")  # the whole first reply
        child.sendline("/reset")
        child.expect(r"\(history cleared\)")
        child.expect("you> ")
        child.sendline("and again")
        child.expect("assistant> ")
        child.expect(r"\S{3}")  # some of the reply is out
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("you> ")  # still chatting
        child.sendline("one more")
        child.expect("assistant> ")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_a_model_without_a_chat_template(model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model.iterdir():
        (bare / f.name).symlink_to(f)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").unlink()
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        if (bare / name).exists():
            (bare / name).unlink()
    child = _spawn(bare)
    child.expect("no chat template")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
