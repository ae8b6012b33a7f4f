"""`nanor1 chat MODEL`: a terminal chat that streams the model's thinking (dimmed) and then its answer.

Multi-turn: only the answers go back into the history, never earlier reasoning (as DeepSeek advises).
Commands: /reset starts over, /exit (or Ctrl-D) quits, Ctrl-C stops the current answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO

import torch

from nanor1.common import NanoR1Error
from nanor1.engine import Engine, SamplingParams
from nanor1.serve.protocol import OutputText, ReasoningSplitter, encode_chat

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"
HELP = "commands: /reset (new conversation), /exit (quit); Ctrl-C stops an answer"


@dataclass
class ChatSettings:
    temperature: float = 0.6  # DeepSeek-R1's recommended sampling for its reasoning models
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None
    system: str | None = None


class ChatSession:
    """A conversation over one engine: `reply(text)` streams ("reasoning" | "content", delta) pairs."""

    def __init__(self, engine: Engine, tokenizer, settings: ChatSettings = ChatSettings()):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.messages: list[dict] = []
        self.turns = 0
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.settings.system}] if self.settings.system else []

    def reply(self, text: str) -> Iterator[tuple[str, str]]:
        """Generate the answer to `text`; the turn joins the history only once it is complete."""
        s = self.settings
        user = {"role": "user", "content": text}
        ids = encode_chat(self.tokenizer, self.messages + [user])
        if len(ids) >= self.engine.max_seq_len:
            raise NanoR1Error(f"the conversation is {len(ids)} tokens, beyond the model's context of "
                              f"{self.engine.max_seq_len}; type /reset to start over")
        params = SamplingParams(max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, seed=None if s.seed is None else s.seed + self.turns)
        rid = self.engine.add_request(ids, params, stream=True)
        splitter = ReasoningSplitter(opened=self.tokenizer.decode(ids[-4:]).rstrip().endswith("<think>"))
        output, answer, done = OutputText(self.tokenizer), "", False
        try:
            with torch.inference_mode():
                while not done:
                    for out in self.engine.step():
                        if out.request_id != rid:
                            continue
                        r, c = splitter.feed(output.add(out), out.token_id is not None)
                        if out.finished:
                            r2, c2 = splitter.finish()
                            r, c, done = r + r2, c + c2, True
                        if r:
                            yield "reasoning", r
                        if c:
                            answer += c
                            yield "content", c
        finally:
            if not done:  # interrupted: free the slot, and keep this half turn out of the history
                self.engine.abort(rid)
        self.messages += [user, {"role": "assistant", "content": answer}]
        self.turns += 1


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             color: bool | None = None) -> None:
    """The read-reply loop. `read` is `input` in a terminal; tests pass a scripted one."""
    color = out.isatty() if color is None else color
    dim, bold, reset = (DIM, BOLD, RESET) if color else ("", "", "")
    out.write(f"{HELP}\n")
    while True:
        try:
            text = read(f"{bold}you>{reset} ").strip()
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            continue
        kind = None
        try:
            for part, delta in session.reply(text):
                if part != kind:  # thinking is dimmed; the answer starts on its own line
                    out.write((reset if kind == "reasoning" else "") + ("\n" if kind else ""))
                    out.write(dim if part == "reasoning" else "")
                    kind = part
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(f"{reset}\n(stopped)")
        except NanoR1Error as e:
            out.write(f"{reset}error: {e}")
        out.write((reset if kind == "reasoning" else "") + "\n\n")
        out.flush()


def chat(path: str, device: str | None = None, settings: ChatSettings = ChatSettings()) -> None:
    """`nanor1 chat MODEL`: load a checkpoint (or any model `nanor1.policy` loads) and chat in the terminal."""
    from nanor1.serve.server import load_engine
    engine, tokenizer = load_engine(path, device, max_batch=1)
    try:  # arrow keys and history in input(), where the platform has readline
        import readline  # noqa: F401
    except ImportError:
        pass
    run_chat(ChatSession(engine, tokenizer, settings))
