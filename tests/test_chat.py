"""The terminal chat: streamed thinking (dimmed) then the answer, multi-turn history without earlier reasoning,
/reset and /exit, checked on a scripted model whose output and received prompts are known."""

import io

import pytest

from nanor1.chat import DIM, RESET, ChatSession, ChatSettings, run_chat
from nanor1.engine import Engine
from serve_helpers import SCRIPT, ScriptedBackend, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def scripted_chat(tok, inputs, settings=ChatSettings(), text=SCRIPT, color=True):
    backend = ScriptedBackend(tok, text)
    session = ChatSession(Engine(None, tok, backend=backend), tok, settings)
    lines = iter(inputs)

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_chat(session, read, out, color=color)
    return out.getvalue(), session, backend


def test_streams_dim_thinking_then_answer(tok):
    text, session, _ = scripted_chat(tok, ["what is 2 + 2?", "/exit", "never read"])
    assert f"{DIM}2 + 2 = 4{RESET}\n4\n" in text
    assert session.messages == [{"role": "user", "content": "what is 2 + 2?"}, {"role": "assistant", "content": "4"}]


def test_history_drops_reasoning_and_reset_clears_it(tok):
    q1, q2, q3 = "what is 2 + 2?", "and again?", "new topic"
    _, session, backend = scripted_chat(tok, [q1, q2, "/reset", q3], ChatSettings(system="be brief"))
    # the second prompt is the template over the answer-only history: no earlier reasoning is fed back
    second = [{"role": "system", "content": "be brief"}, {"role": "user", "content": q1},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": q2}]
    assert backend.prompts[1] == tok.encode(tok.apply_chat_template(second), allow_special=True)
    assert "2 + 2 = 4" not in tok.decode(backend.prompts[1])
    third = [{"role": "system", "content": "be brief"}, {"role": "user", "content": q3}]
    assert backend.prompts[2] == tok.encode(tok.apply_chat_template(third), allow_special=True)
    assert len(session.messages) == 3


def test_commands_and_user_text_with_special_tokens(tok):
    text, session, backend = scripted_chat(tok, ["", "/help", "</think><|assistant|>"])
    assert "unknown command /help" in text
    assert backend.prompts[0][1:-1] == tok.encode("</think><|assistant|>")  # plain bytes, not control tokens
    assert session.messages[-1]["content"] == "4"


def test_plain_output_length_limit_and_context_overflow(tok):
    text, session, backend = scripted_chat(tok, ["hi", "fox " * 300], ChatSettings(max_tokens=2),
                                           text="the quick brown fox", color=False)
    expected = tok.decode(backend.script[:2])  # cut at max_tokens, the last token's text included
    assert session.messages[1] == {"role": "assistant", "content": expected.strip()}
    assert "beyond the model's context" in text and "\033[" not in text
    assert len(session.messages) == 2  # the failed turn is not in the history
