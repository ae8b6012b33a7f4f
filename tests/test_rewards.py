"""Rewards: each a pure function, checked on hand-computed values and adversarial completions."""

import sys
import textwrap

import pytest

from nanor1.common import NanoR1Error
from nanor1.config import load_config
from nanor1.rewards import (
    Extraction,
    RewardConfig,
    Script,
    accuracy_reward,
    compute_rewards,
    format_reward,
    language_consistency_reward,
    load_user_reward,
    overlong_reward,
)
from nanor1.tasks import get_task
from nanor1.tasks.base import make_problem

TASK = get_task("chain_sum")
P = make_problem("chain_sum", "3+5+8+2+7+4", "29")

GOOD = " <think> 3+5=8, 8+8=16, 16+2=18, 18+7=25, 25+4=29 </think> <answer> 29 </answer>"
WRONG = " <think> 3+5=8 </think> <answer>28</answer>"

ADVERSARIAL = {   # all malformed: format 0, strict accuracy 0 even though "29" appears
    "nested": "<think>x</think><answer><answer>29</answer></answer>",
    "empty answer": "<think>x</think><answer></answer>",
    "tag inside answer": "<think>x</think><answer>29</think></answer>",
    "two answers": "<think>x</think><answer>28</answer><answer>29</answer>",
    "two thinks": "<think>a</think><think>b</think><answer>29</answer>",
    "no tags": "29",
    "unclosed think": "<think> 29",
    "trailing text": "<think>x</think><answer>29</answer> 30",
    "huge": "<think>" + "1+1=2, " * 200_000 + "</think><answer>29</answer>" + "<answer>" * 1000,
    "bytes": b"\xff\xfe<think>\x80</think><answer>29</answer><answer>",
    "lone surrogate": "<think>\udcff</think><answer>29\udcff</answer></answer>",
}


def test_accuracy_strict_and_lenient():
    assert accuracy_reward(GOOD, P, TASK) == 1.0
    assert accuracy_reward(WRONG, P, TASK) == 0.0
    assert accuracy_reward("the answer is 29", P, TASK) == 0.0                      # strict needs the tags
    assert accuracy_reward("the answer is 29", P, TASK, Extraction.LENIENT) == 1.0
    assert accuracy_reward("<answer>29</answer>", P, TASK) == 0.0
    assert accuracy_reward("<answer>29</answer>", P, TASK, require_think=False) == 1.0


def test_format_reward():
    assert format_reward(GOOD) == 1.0 and format_reward(WRONG) == 1.0
    assert format_reward("<answer>29</answer>") == 0.0
    assert format_reward("<answer>29</answer>", require_think=False) == 1.0
    assert format_reward(b" <think> a </think> <answer>\xff</answer>") == 1.0   # bytes decoded with U+FFFD


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completions_get_no_reward(name):
    c = ADVERSARIAL[name]
    assert format_reward(c) == 0.0
    assert accuracy_reward(c, P, TASK) == 0.0
    assert 0.0 <= language_consistency_reward(c) <= 1.0


def test_language_consistency_hand_counted():
    c = "<think> the cat 猫 sat, 3+5=8 </think> <answer>8</answer>"
    # words: the, cat, sat (latin) and 猫 (cjk); numbers and symbols are neutral
    assert language_consistency_reward(c, Script.LATIN) == pytest.approx(3 / 4)
    assert language_consistency_reward(c, "cjk") == pytest.approx(1 / 4)
    assert language_consistency_reward("<think>我们计算 three</think><answer>3</answer>", "cjk") == pytest.approx(4 / 5)
    assert language_consistency_reward("<think>привет world</think>", Script.CYRILLIC) == pytest.approx(1 / 2)
    assert language_consistency_reward("<think>3+5=8, 8+8=16</think><answer>16</answer>") == 1.0
    assert language_consistency_reward("no tags at all, 日本") == pytest.approx(4 / 6)   # whole text judged


@pytest.mark.parametrize("n, expected", [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95),
                                         (100, -1.0), (101, -1.0), (10_000, -1.0)])
def test_overlong_reward_dapo_eq13(n, expected):
    # L_max = 100, L_cache = 20: soft band 80 < |y| <= 100 with ((L_max - L_cache) - |y|) / L_cache
    assert overlong_reward(n, 100, 20) == pytest.approx(expected)


def test_overlong_reward_edges():
    assert overlong_reward(100, 100, 0) == 0.0 and overlong_reward(101, 100, 0) == -1.0
    with pytest.raises(NanoR1Error):
        overlong_reward(5, 100, 200)


def test_default_weights_give_the_speedrun_scheme():
    out = compute_rewards([GOOD, WRONG, "29", "<think>x</think><answer></answer>"], [P] * 4, TASK, RewardConfig())
    assert out["total"] == pytest.approx([1.0, 0.1, 0.0, 0.0])
    assert out["accuracy"] == [1.0, 0.0, 0.0, 0.0] and out["format"] == [1.0, 1.0, 0.0, 0.0]
    assert "overlong" not in out


def test_word_scripts_take_the_ascii_shortcut_exactly():
    """ASCII letter runs skip the per-character Unicode lookup: the words must be those of the lookup."""
    import unicodedata

    from nanor1.rewards import _LETTERS, _NO_SPACES, _words

    def by_lookup(text):
        out = []
        for run in _LETTERS.findall(text):
            prev = None
            for ch in run:
                s = unicodedata.name(ch, "").split(" ", 1)[0]
                if s != prev or s in _NO_SPACES:
                    out.append(s)
                prev = s
        return out

    for text in ("plain ascii words, 3 + 4 = 7", "abcпривет mixed", "naïve café", "日本語 and 한국어", "x_y9z", ""):
        assert _words(text) == by_lookup(text), text


def test_weighted_sum_with_overlong_and_language():
    cfg = RewardConfig(accuracy=1.0, format=0.5, language=0.2, overlong=1.0, max_tokens=100, cache_tokens=20)
    out = compute_rewards([GOOD, "wrong 猫"], [P, P], TASK, cfg, n_tokens=[90, 10])
    assert out["overlong"] == pytest.approx([-0.5, 0.0])
    assert out["language"] == pytest.approx([1.0, 0.5])
    assert out["total"] == pytest.approx([1.0 + 0.5 + 0.2 - 0.5, 0.2 * 0.5])
    with pytest.raises(NanoR1Error, match="token counts"):
        compute_rewards([GOOD], [P], TASK, cfg)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(textwrap.dedent("""
        def short(completion, problem):
            return 1.0 if len(completion) < 40 else 0.0
        def boom(completion, problem):
            raise ZeroDivisionError("bad luck")
        def text(completion, problem):
            return "yes"
        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("myrewards", None)
    load_user_reward.cache_clear()


def test_user_rewards(user_module):
    cfg = RewardConfig(user=["myrewards:short"], user_weights=[2.0])
    out = compute_rewards([GOOD, "<think></think><answer>29</answer>"], [P, P], TASK, cfg)
    assert out["myrewards:short"] == [0.0, 1.0]
    assert out["total"] == pytest.approx([1.0, 1.0 + 2.0])
    fn = load_user_reward(f"{user_module / 'myrewards.py'}:short")   # a file path works too
    assert fn("x", P) == 1.0


@pytest.mark.parametrize("spec, message", [
    ("myrewards", "must look like module:function"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("myrewards:missing", "has no function 'missing'"),
    ("myrewards:NOT_A_FUNCTION", "not a function"),
    ("/nonexistent/file.py:f", "not found"),
])
def test_user_reward_loading_errors(user_module, spec, message):
    with pytest.raises(NanoR1Error, match=message):
        load_user_reward(spec)


def test_user_reward_failures_name_the_function(user_module):
    with pytest.raises(NanoR1Error, match=r"myrewards:boom raised ZeroDivisionError: bad luck"):
        compute_rewards([GOOD], [P], TASK, RewardConfig(user=["myrewards:boom"]))
    with pytest.raises(NanoR1Error, match="myrewards:text returned 'yes'"):
        compute_rewards([GOOD], [P], TASK, RewardConfig(user=["myrewards:text"]))


def test_reward_config_from_yaml_overrides():
    cfg = load_config(RewardConfig, overrides=["accuracy=1", "format=0", "extraction=lenient", "script=cjk",
                                               "user=[a:b]", "user_weights=[0.5]"])
    assert cfg.extraction is Extraction.LENIENT and cfg.script is Script.CJK and cfg.user_weights == [0.5]
    with pytest.raises(NanoR1Error, match="user_weights"):
        load_config(RewardConfig, overrides=["user=[a:b]", "user_weights=[1, 2]"])
