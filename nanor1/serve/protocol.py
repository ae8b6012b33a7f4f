"""The OpenAI-compatible wire format: request/response models, limits, errors, and the chat text protocol.

`encode_chat` turns messages into prompt ids with user text never becoming control tokens; `ReasoningSplitter`
turns streamed model text into DeepSeek-style `reasoning_content` (inside <think>) and `content` deltas.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------- limits and errors


@dataclass(frozen=True)
class ServeLimits:
    max_tokens: int = 1024  # per choice; bigger asks get a 400
    default_max_tokens: int = 256  # when the request names none
    max_n: int = 8  # choices per request (times prompts, for /v1/completions)
    max_prompt_tokens: int | None = None  # None: the model's context minus one
    max_body_bytes: int = 1 << 20
    max_stop: int = 4  # stop strings per request, as OpenAI
    max_waiting: int = 512  # requests queued or running; more get a 429


class APIError(Exception):
    """An error sent to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------- requests
# strict=True: "5" is not an integer and "true" is not a boolean, as in OpenAI's API; unknown fields
# (user, frequency_penalty, ...) are accepted and ignored so that stock clients work unchanged.


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="nanor1 extension: sample from the k most likely tokens")
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="any integer; reduced modulo 2**63")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="text, tokenized as plain text (special-token strings included)")


# ----------------------------------------------------------------------------- responses (for the OpenAPI spec)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


# ----------------------------------------------------------------------------- chat prompt -> ids

_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them
_TAG_SPLIT = re.compile("(<think>|</think>|<answer>|</answer>)")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the template's: `developer` is `system`, and assistant turns before the last message
    lose their reasoning (text up to the last </think>), which DeepSeek says not to feed back."""
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        role = "system" if role == "developer" else role
        if role == "assistant" and i != len(messages) - 1 and "</think>" in content:
            content = content.split("</think>")[-1].strip()
        out.append({"role": role, "content": content})
    return out


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids for a chat, laid out by the tokenizer's own chat template, with every message's content
    encoded as plain text: "</think>" or "<|user|>" typed by a user stays bytes, never a control token.

    The template is rendered with a sentinel in place of each content; the text around the sentinels is the
    template's own (its markers are special tokens), and each sentinel becomes that message's plain encoding.
    """
    messages = normalize_messages(messages)
    marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=add_generation_prompt)
    ids: list[int] = []
    for k, piece in enumerate(_SENTINEL.split(rendered)):
        if k % 2 == 0:
            ids += tokenizer.encode(piece, allow_special=True) if piece else []
        else:
            m = messages[int(piece)]
            ids += _encode_content(tokenizer, m["content"], m["role"] == "assistant")
    return ids


def _encode_content(tokenizer, text: str, reasoning_tags: bool) -> list[int]:
    """Plain text; an assistant turn keeps its <think>/<answer> tags as the tag tokens it was generated as
    (role and end-of-sequence markers stay plain text in every role)."""
    if not reasoning_tags:
        return tokenizer.encode(text, allow_special=False)
    ids: list[int] = []
    for k, part in enumerate(_TAG_SPLIT.split(text)):
        if part:
            ids += tokenizer.encode(part, allow_special=k % 2 == 1)
    return ids


# ----------------------------------------------------------------------------- model text -> reasoning, content

class OutputText:
    """One generation's text as its StepOutputs arrive. When a request ends on its length limit, the engine's
    last text delta can come back empty; the decoded ids are the ground truth, so the rest is taken from them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, out) -> str:
        """The new text of StepOutput `out`."""
        delta = out.text_delta
        if out.token_id is not None:
            self.ids.append(out.token_id)
        if out.finished and out.finish_reason == "length":
            full = self.tokenizer.decode(self.ids)
            if full.startswith(self.text) and len(full) > len(self.text + delta):
                delta = full[len(self.text):]
        self.text += delta
        return delta


THINK_OPEN, THINK_CLOSE, ANSWER_TAGS = "<think>", "</think>", ("<answer>", "</answer>")


class Phase(enum.Enum):
    START = "start"  # nothing but whitespace yet: may still open with <think>
    REASONING = "reasoning"
    ANSWER = "answer"  # after </think>, or plain text that never opened <think>


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `tags` (held back for now)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class _Channel:
    """Emits text with leading and trailing whitespace removed, as `str.strip()` would on the whole: trailing
    whitespace is held until more text follows it."""

    def __init__(self):
        self.started, self.pending = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        kept = text.rstrip()
        self.pending = text[len(kept):]
        return kept


class ReasoningSplitter:
    """Streamed model text -> (reasoning delta, content delta).

    "<think> r </think> <answer> a </answer>" gives reasoning "r" and content "a" (the answer tags dropped),
    exactly what `nanor1.templates.split_reasoning` gives for the whole text; text that does not open with
    <think> is all content. `opened=True` is for prompts that already end with <think>. `reasoning_tokens`
    counts the tokens up to and including the one that closed </think>.
    """

    def __init__(self, opened: bool = False):
        self.phase = Phase.REASONING if opened else Phase.START
        self.thought = opened  # did the text ever enter <think>?
        self.buf = ""
        self.reasoning, self.content = _Channel(), _Channel()
        self.n_tokens = self.reasoning_tokens = 0

    def feed(self, text: str, token: bool = True) -> tuple[str, str]:
        self.n_tokens += token
        before = self.phase
        self.buf += text
        r, c = self._drain(final=False)
        if self.phase is Phase.REASONING or (before is not Phase.ANSWER and self.phase is Phase.ANSWER
                                             and self.thought):
            self.reasoning_tokens = self.n_tokens
        return r, c

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (a partial tag at the very end is text after all)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        r = c = ""
        if self.phase is Phase.START:
            head = self.buf.lstrip()
            if head.startswith(THINK_OPEN):
                self.phase, self.buf, self.thought = Phase.REASONING, head[len(THINK_OPEN):], True
            elif head and (final or not THINK_OPEN.startswith(head)):
                self.phase = Phase.ANSWER
            else:
                return "", ""
        if self.phase is Phase.REASONING:
            i = self.buf.find(THINK_CLOSE)
            if i < 0:
                keep = 0 if final else _partial_suffix(self.buf, (THINK_CLOSE,))
                r = self.reasoning.push(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return r, ""
            r = self.reasoning.push(self.buf[:i])
            self.phase, self.buf = Phase.ANSWER, self.buf[i + len(THINK_CLOSE):]
        for tag in ANSWER_TAGS:
            self.buf = self.buf.replace(tag, "")
        keep = 0 if final else _partial_suffix(self.buf, ANSWER_TAGS)
        c = self.content.push(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return r, c
