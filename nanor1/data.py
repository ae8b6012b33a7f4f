"""Training data as token arrays: a packed pretraining stream (memory-mapped, cached on disk) and chat SFT
examples with a loss mask on assistant tokens only. Every batch is a pure function of (seed, step, micro).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from nanor1.common import SHAPE_MULTIPLE, NanoR1Error, atomic_write_bytes, round_up, sha256_bytes


# ----------------------------------------------------------------------------- pretraining stream

def jsonl_rows(path: Path) -> Iterable[tuple[int, object]]:
    """(line number, parsed row) for each non-blank line; a malformed line is an error naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                raise NanoR1Error(f"{path}:{n}: not valid JSON") from None


def read_text_documents(path: str | Path, field: str = "text") -> Iterable[str]:
    """Documents from a .txt file (blank-line separated) or a .jsonl file (one {"text": ...} per line)."""
    path = Path(path)
    if not path.is_file():
        raise NanoR1Error(f"{path}: data file not found")
    if path.suffix == ".jsonl":
        for n, row in jsonl_rows(path):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise NanoR1Error(f"{path}:{n}: missing text field {field!r} (set the field name)")
            yield row[field]
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        for doc in text.split("\n\n"):
            if doc.strip():
                yield doc.strip()


def build_token_stream(docs: Iterable[str], tokenizer, cache_dir: str | Path, name: str) -> np.ndarray:
    """Tokenize documents once as <bos> doc <eos> ..., store as uint16/uint32 .bin, return a memmap.

    The file name carries a hash of the token ids' source (documents + tokenizer), so a changed corpus or
    tokenizer never reuses a stale cache."""
    docs = list(docs)
    if not docs:
        raise NanoR1Error(f"{name}: no documents to train on")
    vocab = tokenizer.vocab_size
    key = sha256_bytes(("\x00".join(docs) + json.dumps(tokenizer.encode("probe 123 <think>")) + str(vocab)).encode())
    dtype = np.uint16 if vocab < 2 ** 16 else np.uint32
    path = Path(cache_dir) / f"{name}-{key[:16]}.bin"
    if not path.exists():
        ids: list[int] = []
        for d in docs:
            ids.append(tokenizer.bos_id)
            ids.extend(tokenizer.encode(d, allow_special=True))
            ids.append(tokenizer.eos_id)
        atomic_write_bytes(path, np.asarray(ids, dtype=dtype).tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


def window_starts(data: np.ndarray, bos_id: int | None, seq_len: int) -> np.ndarray:
    """Where training windows may start: every document's <bos>, plus every seq_len tokens inside documents
    longer than a window. Windows that start mid-document would show the model reasoning steps whose
    question lies before the window, which teaches it to make up the numbers it should copy."""
    last = len(data) - seq_len - 1
    if bos_id is None:
        return np.arange(0, last + 1, seq_len)
    bos = np.flatnonzero(np.asarray(data) == bos_id)
    ends = np.append(bos[1:], len(data))
    extra = [np.arange(b + seq_len, e - seq_len // 2, seq_len) for b, e in zip(bos, ends) if e - b > 2 * seq_len]
    starts = np.concatenate([bos, *extra]) if extra else bos
    starts = np.sort(starts[starts <= last])
    return starts if len(starts) else np.arange(0, last + 1, seq_len)


def stream_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0,
                 starts: np.ndarray | None = None):
    """Windows of seq_len + 1 tokens from `starts` (see window_starts; any offset when None), drawn at random;
    inputs and next-token targets, each (B, T)."""
    if len(data) <= seq_len + 1:
        raise NanoR1Error(f"the token stream has {len(data)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                          "use more data or a shorter seq_len")
    rng = np.random.default_rng([seed, step, micro])
    if starts is None:
        picks = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    else:
        picks = starts[rng.integers(0, len(starts), size=batch_size)]
    windows = torch.from_numpy(np.stack([data[s:s + seq_len + 1].astype(np.int64) for s in picks]))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ----------------------------------------------------------------------------- chat SFT

def encode_chat_example(tokenizer, messages: Sequence[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except on assistant turns, their end token included) for one conversation.

    Rendering goes turn by turn through the tokenizer's own chat template, so the mask lines up exactly
    with what the template produces for the whole conversation."""
    if not messages or messages[-1].get("role") != "assistant":
        raise NanoR1Error("an SFT example must end with an assistant message")
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels: list[int] = [-100] * len(ids)
    prefix = ""
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            prompt_part = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)[len(prefix):]
            p_ids = tokenizer.encode(prompt_part, allow_special=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            a_ids = tokenizer.encode(full[len(prefix) + len(prompt_part):], allow_special=True)
            ids += p_ids + a_ids
            labels += [-100] * len(p_ids) + a_ids
            prefix = full
    return ids[:max_len], labels[:max_len]


def sft_batches_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length bucketing: sort by length, cut into batches, shuffle the batches (per epoch, seeded)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, multiple: int = 1):
    """Right-pad (ids, labels) pairs to the longest; returns inputs, shifted targets and the inputs' real (not
    padding) positions, each (B, T-1), with T-1 rounded up to `multiple` (see nanor1.common.SHAPE_MULTIPLE; the
    padding takes no loss, and `real` keeps it out of the MoE expert loads)."""
    T = round_up(max(len(ids) for ids, _ in examples) - 1, multiple) + 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    real = torch.zeros((len(examples), T - 1), dtype=torch.bool)
    for i, (ids, labels) in enumerate(examples):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(labels)] = torch.tensor(labels)
        real[i, : len(ids) - 1] = True
    return x[:, :-1].contiguous(), y[:, 1:].contiguous(), real


class SFTData:
    """Tokenized chat examples served as length-bucketed, padded batches; batch(step) is deterministic."""

    def __init__(self, examples: Sequence[dict], tokenizer, max_len: int, batch_size: int, seed: int):
        if not examples:
            raise NanoR1Error("no SFT examples to train on")
        self.items = [encode_chat_example(tokenizer, ex["messages"], max_len) for ex in examples]
        self.items = [it for it in self.items if any(l != -100 for l in it[1][1:])]
        if not self.items:
            raise NanoR1Error(f"every SFT example is longer than max_len={max_len} before its answer")
        self.pad_id = tokenizer.pad_id
        self.batch_size = min(batch_size, len(self.items))
        self.seed = seed
        self._epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = -(-len(self.items) // self.batch_size)

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1):
        k = step * grad_accum + micro
        epoch, i = divmod(k, self.per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: sft_batches_order([len(x[0]) for x in self.items], self.batch_size, self.seed, epoch)}
        return pad_batch([self.items[j] for j in self._epochs[epoch][i]], self.pad_id, SHAPE_MULTIPLE)


def read_sft_jsonl(path: str | Path) -> list[dict]:
    """Chat examples, one {"messages": [{"role", "content"}, ...]} per line; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise NanoR1Error(f"{path}: SFT data file not found")
    out = []
    for n, row in jsonl_rows(path):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise NanoR1Error(f"{path}:{n}: missing 'messages' (a list of {{role, content}})")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise NanoR1Error(f"{path}:{n}: each message needs role system/user/assistant and text content")
        if msgs[-1]["role"] != "assistant":
            raise NanoR1Error(f"{path}:{n}: the last message must be the assistant's")
        out.append(row)
    if not out:
        raise NanoR1Error(f"{path}: no examples (the file is empty)")
    return out
