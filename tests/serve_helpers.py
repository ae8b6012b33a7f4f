"""Test helpers for the server: a tokenizer trained in a blink, a tiny random model, and a scripted backend
whose "model" emits a fixed text, so that reasoning/answer splitting can be checked against known output."""

from __future__ import annotations

import time

import torch

from nanor1.engine import Engine
from nanor1.model import ModelConfig, Transformer
from nanor1.serve.protocol import ServeLimits
from nanor1.serve.server import BackgroundServer, create_app
from nanor1.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is 2 + 2? the answer is 4",
         "<think> 2 + 2 = 4 </think> <answer> 4 </answer>", "hello there, how are you today?"] * 10
SCRIPT = "<think> 2 + 2 = 4 </think> <answer> 4 </answer>"


def make_tokenizer():
    return train_tokenizer(TEXTS, 300)


def tiny_model(tokenizer, max_seq_len: int = 256):
    cfg = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len)
    return Transformer(cfg).init_weights(0).eval()


class ScriptedBackend:
    """An engine backend that always "predicts" the next token of script_ids (then EOS): one finite logit.
    It records every prompt and every decode batch size; `delay` slows each decode step down."""
    continuous = True

    def __init__(self, tokenizer, text: str = SCRIPT, n_slots: int = 16, max_seq_len: int = 256,
                 delay: float = 0.0):
        self.script = tokenizer.encode(text, allow_special=True) + [tokenizer.eos_id]
        self.vocab, self.n_slots, self.max_seq_len, self.delay = tokenizer.vocab_size, n_slots, max_seq_len, delay
        self.pos: dict[int, int] = {}
        self.prompts: list[list[int]] = []
        self.batches: list[int] = []

    def _logits(self, slots: list[int]) -> torch.Tensor:
        out = torch.full((len(slots), self.vocab), float("-inf"))
        for i, s in enumerate(slots):
            out[i, self.script[min(self.pos[s], len(self.script) - 1)]] = 0.0
        return out

    def prefill(self, prompts, slots):
        for p, s in zip(prompts, slots):
            self.prompts.append(list(p))
            self.pos[s] = 0
        return self._logits(slots)

    def decode(self, tokens, slots):
        self.batches.append(len(slots))
        if self.delay:
            time.sleep(self.delay)
        for s in slots:
            self.pos[s] += 1
        return self._logits(slots)

    def release(self, slot: int) -> None:
        self.pos.pop(slot, None)


def scripted_server(tokenizer, text: str = SCRIPT, delay: float = 0.0, api_key: str | None = None,
                    limits: ServeLimits = ServeLimits(), n_slots: int = 16):
    backend = ScriptedBackend(tokenizer, text, n_slots=n_slots, delay=delay)
    engine = Engine(None, tokenizer, backend=backend)
    app = create_app(engine, tokenizer, "scripted", api_key=api_key, limits=limits)
    return BackgroundServer(app), backend, app


def model_server(tokenizer, model, limits: ServeLimits = ServeLimits(), max_batch: int = 16):
    engine = Engine(model, tokenizer, max_batch=max_batch)
    app = create_app(engine, tokenizer, "tiny", limits=limits)
    return BackgroundServer(app), engine, app


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == key:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
