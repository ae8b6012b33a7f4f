"""Templates: the R1-Zero prompt text, chat rendering, strict/lenient answer extraction, reasoning split."""

import time

import pytest

from nanor1.common import NanoR1Error
from nanor1.templates import (R1_ZERO_PROMPT, Template, extract_answer_lenient, extract_answer_strict,
                              render_prompt, split_reasoning)

# DeepSeek-R1 paper, Table 1, typed out independently of the module.
PAPER = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
         "assistant first thinks about the reasoning process in the mind and then provides the user with the "
         "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
         "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
         "User: prompt. Assistant:")


def test_r1_zero_prompt_is_the_paper_text():
    assert R1_ZERO_PROMPT.replace("{prompt}", "prompt") == PAPER
    assert render_prompt("3+5+8", Template.R1_ZERO) == PAPER.replace("User: prompt.", "User: 3+5+8.")
    assert render_prompt("{x}", "r1-zero").endswith("User: {x}. Assistant:")  # braces in questions are safe


class _FakeTok:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return f"<{messages[0]['role']}>{messages[0]['content']}<gen={add_generation_prompt}>"


def test_chat_template_uses_the_tokenizer():
    assert render_prompt("2+2", Template.CHAT, _FakeTok()) == "<user>2+2<gen=True>"
    assert render_prompt("2+2", "chat", _FakeTok()) == "<user>2+2<gen=True>"
    with pytest.raises(NanoR1Error, match="needs a tokenizer"):
        render_prompt("2+2", Template.CHAT)
    with pytest.raises(NanoR1Error, match="unknown template"):
        render_prompt("2+2", "alpaca")


@pytest.mark.parametrize("completion, strict, strict_no_think", [
    (" <think> 3+5=8, 8+8=16 </think> <answer> 29 </answer>", "29", "29"),
    ("<think>a</think><answer>5</answer>", "5", "5"),
    ("\n<think>\na\n</think>\n\n<answer>\n5\n</answer>\n", "5", "5"),
    ("a </think> <answer>5</answer>", "5", "5"),             # <think> was in the prompt
    ("<think></think><answer>5</answer>", "5", "5"),          # empty reasoning is still well-formed
    ("<answer>5</answer>", None, "5"),                        # no reasoning block
    ("<think>a</think><answer></answer>", None, None),        # empty answer
    ("<think>a</think><answer>   </answer>", None, None),
    ("<think>a</think><answer><answer>5</answer></answer>", None, None),   # nested
    ("<think>a</think><answer>5 <think>b</think></answer>", None, None),   # tags inside the answer
    ("<think>a<think>b</think><answer>5</answer>", None, None),            # nested think
    ("<think>a</think><answer>5</answer><answer>6</answer>", None, None),  # two answers
    ("<think>a</think><answer>5</answer> and more", None, None),           # text after the answer
    ("<think>a</think> so <answer>5</answer>", None, None),                # text between the blocks
    ("<answer>5</answer><think>a</think>", None, None),                    # wrong order
    ("<think>a <answer>5</answer>", None, None),                           # unclosed think
    ("The answer is 5", None, None),
    ("", None, None),
])
def test_strict_extraction(completion, strict, strict_no_think):
    assert extract_answer_strict(completion) == strict
    assert extract_answer_strict(completion, require_think=False) == strict_no_think


@pytest.mark.parametrize("completion, answer", [
    ("<think>2+2=4</think><answer>4</answer>", "4"),
    ("<think>2+2=4</think> <answer> 4", "4"),                         # unclosed answer tag
    ("<think>7</think><answer></answer>", None),                     # a tag, but empty
    ("<answer>1</answer> then <answer>2</answer>", "2"),             # the last tag wins
    ("so x = \\boxed{\\frac{1}{2}} and 3", "\\frac{1}{2}"),         # boxed before numbers
    ("\\boxed{a{b}c} end", "a{b}c"),
    ("<think>3+5=8, 8+4=12</think> the sum is 12.", "12"),
    ("<think>3+5=8</think> total 1,234 apples", "1,234"),
    ("<think>3+5=8, 8+4=12</think>", "12"),                         # nothing after </think>: whole text
    ("first line\nParis\n\n", "Paris"),
    ("ratio -3/4 here", "-3/4"),
    ("   ", None),
    ("", None),
])
def test_lenient_extraction(completion, answer):
    assert extract_answer_lenient(completion) == answer


@pytest.mark.parametrize("completion, reasoning, content", [
    (" <think> 3+5=8 </think> <answer> 8 </answer>", "3+5=8", "8"),
    ("<think> still thinking 3+5", "still thinking 3+5", ""),      # unclosed: all reasoning
    ("plain answer", "", "plain answer"),
    ("a </think> b", "a", "b"),
    ("<think>x</think>y</think>z", "x</think>y", "z"),
])
def test_split_reasoning(completion, reasoning, content):
    assert split_reasoning(completion) == (reasoning, content)


def test_huge_adversarial_outputs_are_fast():
    bombs = ["</think><answer>" * 50_000 + "x", "<think>" + "9" * 1_000_000, "\\boxed{" * 50_000,
             "<answer>" * 50_000, "x\n" * 500_000]
    t = time.time()
    for b in bombs:
        assert extract_answer_strict(b) is None
        extract_answer_lenient(b)
        split_reasoning(b)
    assert time.time() - t < 2.0
