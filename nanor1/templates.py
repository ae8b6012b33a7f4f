"""Prompt templates (R1-Zero, chat) and answer extraction, strict (the tags) and lenient (last number etc.).

Strict and lenient extraction side by side let evaluation report format and content separately.
The completion is the text generated after the prompt, e.g. " <think> 3+5=8 </think> <answer> 8 </answer>".
"""

from __future__ import annotations

import enum
import re

from nanor1.common import NanoR1Error


class Template(enum.Enum):
    R1_ZERO = "r1-zero"
    CHAT = "chat"


# DeepSeek-R1 paper, Table 1, with "prompt" replaced by the question.
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:")

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def render_prompt(question: str, template: Template | str, tokenizer=None) -> str:
    """The prompt text; encode it with allow_special=True so the tags in it are the tag tokens."""
    try:
        template = Template(template)
    except ValueError:
        raise NanoR1Error(f"unknown template {template!r}; use one of {[t.value for t in Template]}") from None
    if template is Template.R1_ZERO:
        return R1_ZERO_PROMPT.replace("{prompt}", question)
    if tokenizer is None:
        raise NanoR1Error("the chat template needs a tokenizer (its chat template renders the prompt)")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


# The well-formed completion: an optional opening <think> (a prompt may end with it), the reasoning,
# </think>, then exactly one <answer>...</answer> and nothing after it but whitespace.
_WELL_FORMED = re.compile(r"\s*(?:<think>)?(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANSWER_ONLY = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def _has_tag(text: str) -> bool:
    return any(t in text for t in TAGS)


def parse_well_formed(completion: str, require_think: bool = True) -> tuple[str, str] | None:
    """(reasoning, answer) when the completion is exactly <think>r</think><answer>a</answer> with no
    stray, nested or repeated tags and a non-empty answer; else None. require_think=False also accepts
    a bare <answer>a</answer> (reasoning "")."""
    # Counting first keeps the regex linear on huge adversarial outputs with thousands of tags.
    counts = [completion.count(t) for t in TAGS]
    if counts[0] > 1 or counts[1] > 1 or counts[2] != 1 or counts[3] != 1:
        return None
    m = _WELL_FORMED.fullmatch(completion)
    if m is None and not require_think:
        m = _ANSWER_ONLY.fullmatch(completion)
    if m is None:
        return None
    think = m.groupdict().get("think") or ""
    answer = m.group("answer")
    if _has_tag(think) or _has_tag(answer) or not answer.strip():
        return None
    return think.strip(), answer.strip()


def extract_answer_strict(completion: str, require_think: bool = True) -> str | None:
    """The content of the single <answer>...</answer> after </think>, only in a well-formed completion."""
    parsed = parse_well_formed(completion, require_think)
    return parsed[1] if parsed else None


_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts[-4:]):  # a few tries only: each unbalanced one scans to the end
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def _strip_tags(text: str) -> str:
    for t in TAGS:
        text = text.replace(t, " ")
    return text.strip()


def extract_answer_lenient(completion: str) -> str | None:
    """The last <answer> tag's content if there is a tag (None when it is empty), else the last \\boxed{},
    else the last number, else the last non-empty line. Text after the last </think> is searched before
    the whole completion, so numbers in the reasoning lose to those in the answer part."""
    if "<answer>" in completion:
        return _strip_tags(completion.rsplit("<answer>", 1)[1].split("</answer>", 1)[0]) or None
    tail = completion.rsplit("</think>", 1)[-1]
    for text in (tail, completion) if tail.strip() else (completion,):
        if boxed := _last_boxed(text):
            return boxed
        if numbers := _NUMBER.findall(text):
            return numbers[-1]
        for line in reversed(text.splitlines()):
            if line := _strip_tags(line):
                return line
    return None


def split_reasoning(completion: str) -> tuple[str, str]:
    """(reasoning, answer text) for the server's reasoning_content/content. Text with an unclosed <think>
    is all reasoning; otherwise reasoning ends at the last </think>, and the answer loses its tags."""
    if "</think>" not in completion:
        if "<think>" in completion:
            return completion.split("<think>", 1)[1].strip(), ""
        head, answer = "", completion
    else:
        head, answer = completion.rsplit("</think>", 1)
    reasoning = head.split("<think>", 1)[1] if "<think>" in head else head
    answer = answer.replace("<answer>", "").replace("</answer>", "")
    return reasoning.strip(), answer.strip()
