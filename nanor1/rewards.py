"""Rule-based rewards (DeepSeek-R1 section 2.2.2): accuracy, format, language consistency, DAPO overlong shaping,
and user rewards given as `module:function`. Each is a pure function of text and numbers.

Example: `compute_rewards([" <think> 3+5=8 </think> <answer>8</answer>"], [problem], task, RewardConfig())`.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from nanor1.common import NanoR1Error
from nanor1.templates import extract_answer_lenient, extract_answer_strict, parse_well_formed, split_reasoning


class Extraction(enum.Enum):
    STRICT = "strict"    # only a well-formed <think>..</think><answer>..</answer> has an answer
    LENIENT = "lenient"  # answer tag, else \boxed{}, else last number, else last line


class Script(enum.Enum):
    """Writing systems for the language-consistency reward, by Unicode character-name prefix."""
    LATIN = "latin"
    CJK = "cjk"          # Han ideographs, kana and hangul
    CYRILLIC = "cyrillic"
    GREEK = "greek"
    ARABIC = "arabic"
    HEBREW = "hebrew"
    DEVANAGARI = "devanagari"
    THAI = "thai"


_SCRIPT_PREFIXES = {Script.CJK: ("CJK", "HIRAGANA", "KATAKANA", "HANGUL")}
_NO_SPACES = ("CJK", "HIRAGANA", "KATAKANA", "THAI")  # scripts written without spaces: one char, one word
_LETTERS = re.compile(r"[^\W\d_]+")


def _text(completion: str | bytes) -> str:
    """Completions are text; raw bytes (e.g. a cut multi-byte character) are decoded with replacement."""
    return completion.decode("utf-8", errors="replace") if isinstance(completion, bytes) else completion


def _char_script(ch: str) -> str:
    return unicodedata.name(ch, "").split(" ", 1)[0]


def _words(text: str) -> list[str]:
    """Script name of each word: runs of letters, split where the script changes; CJK/Thai char by char."""
    out = []
    for run in _LETTERS.findall(text):
        if run.isascii():  # ASCII letters are all Latin: one word, without a Unicode name lookup per character
            out.append("LATIN")
            continue
        prev = None
        for ch in run:
            s = _char_script(ch)
            if s != prev or s in _NO_SPACES:
                out.append(s)
            prev = s
    return out


# ----------------------------------------------------------------------------- the rewards

def accuracy_reward(completion: str, problem, task, extraction: Extraction = Extraction.STRICT,
                    require_think: bool = True) -> float:
    """The task's scorer on the extracted answer; no extractable answer scores 0."""
    completion = _text(completion)
    if extraction is Extraction.STRICT:
        answer = extract_answer_strict(completion, require_think)
    else:
        answer = extract_answer_lenient(completion)
    score = float(task.score(answer, problem))
    return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


def format_reward(completion: str, require_think: bool = True) -> float:
    """1 for exactly one <think>...</think><answer>...</answer> (no nested, repeated or stray tags, a
    non-empty answer, nothing after it), else 0. The opening <think> may be in the prompt instead."""
    return float(parse_well_formed(_text(completion), require_think) is not None)


def language_consistency_reward(completion: str, script: Script | str = Script.LATIN) -> float:
    """Share of the reasoning's words written in the target script (R1 section 2.3.2). Words are letter
    runs, so numbers and symbols are neutral; with no words at all the reasoning is consistent (1.0).
    Without think tags the whole completion is judged."""
    script = Script(script)
    completion = _text(completion)
    reasoning = split_reasoning(completion)[0] or completion
    words = _words(reasoning)
    if not words:
        return 1.0
    prefixes = _SCRIPT_PREFIXES.get(script, (script.name,))
    return sum(w in prefixes for w in words) / len(words)


def overlong_reward(n_tokens: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO soft overlong punishment (Yu et al. 2025, eq. 13), L_max = max_tokens, L_cache = cache_tokens:
    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max;
    -1 if |y| > L_max."""
    if not 0 <= cache_tokens <= max_tokens:
        raise NanoR1Error(f"overlong reward: need 0 <= cache_tokens ({cache_tokens}) <= max_tokens ({max_tokens})")
    if n_tokens > max_tokens:
        return -1.0
    soft_start = max_tokens - cache_tokens
    if n_tokens <= soft_start:
        return 0.0
    return (soft_start - n_tokens) / cache_tokens


# ----------------------------------------------------------------------------- user rewards

UserReward = Callable[..., float]  # fn(completion: str, problem: Problem) -> float


@functools.lru_cache(maxsize=None)  # compute_rewards runs every step: import each user module once
def load_user_reward(spec: str) -> UserReward:
    """"package.module:function" or "path/to/file.py:function"; called as fn(completion, problem)."""
    module_name, sep, fn_name = spec.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise NanoR1Error(f"user reward {spec!r} must look like module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise NanoR1Error(f"user reward {spec}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(f"nanor1_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except NanoR1Error:
        raise
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        raise NanoR1Error(f"user reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise NanoR1Error(f"user reward {spec}: {module_name} has no function {fn_name!r}")
    if not callable(fn):
        raise NanoR1Error(f"user reward {spec}: {fn_name} is a {type(fn).__name__}, not a function")
    return fn


def call_user_reward(fn: UserReward, spec: str, completion: str, problem) -> float:
    try:
        value = fn(completion, problem)
    except Exception as e:
        raise NanoR1Error(f"user reward {spec} raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NanoR1Error(f"user reward {spec} returned {value!r}; it must return a finite number")
    return float(value)


# ----------------------------------------------------------------------------- the weighted sum

@dataclass
class RewardConfig:
    """Weights of each reward in `total`. The defaults give the speedrun's scheme: 1.0 for a correct
    well-formed answer (0.9 + 0.1), 0.1 for well-formed but wrong, 0 otherwise (strict extraction)."""
    accuracy: float = 0.9
    format: float = 0.1
    language: float = 0.0
    overlong: float = 0.0
    extraction: Extraction = Extraction.STRICT
    require_think: bool = True      # False also accepts a bare <answer>..</answer> as well-formed
    script: Script = Script.LATIN   # target script of the language-consistency reward
    max_tokens: int = 256           # DAPO L_max: the generation budget
    cache_tokens: int = 64          # DAPO L_cache: the soft-penalty band below L_max
    user: list[str] = field(default_factory=list)            # "module:function" specs
    user_weights: list[float] = field(default_factory=list)  # one per user reward; empty means all 1.0

    def validate(self) -> None:
        if self.user_weights and len(self.user_weights) != len(self.user):
            raise NanoR1Error(f"rewards: {len(self.user_weights)} user_weights for {len(self.user)} user rewards; "
                              "give one weight per reward or none")
        if not 0 <= self.cache_tokens <= self.max_tokens:
            raise NanoR1Error(f"rewards: need 0 <= cache_tokens ({self.cache_tokens}) <= max_tokens "
                              f"({self.max_tokens})")


def compute_rewards(completions: Sequence[str], problems: Sequence, task, cfg: RewardConfig,
                    n_tokens: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Every reward per completion plus the weighted "total". problems[i] is the problem of completions[i];
    "overlong" needs n_tokens (completion lengths in tokens) and is present only when they are given."""
    cfg.validate()
    if len(problems) != len(completions) or (n_tokens is not None and len(n_tokens) != len(completions)):
        raise ValueError("completions, problems and n_tokens must have the same length")
    if cfg.overlong and n_tokens is None:
        raise NanoR1Error("rewards: the overlong reward has a weight but no token counts were given")
    texts = [_text(c) for c in completions]
    out: dict[str, list[float]] = {
        "accuracy": [accuracy_reward(c, p, task, cfg.extraction, cfg.require_think) for c, p in zip(texts, problems)],
        "format": [format_reward(c, cfg.require_think) for c in texts],
        "language": [language_consistency_reward(c, cfg.script) for c in texts],
    }
    weights = {"accuracy": cfg.accuracy, "format": cfg.format, "language": cfg.language}
    if n_tokens is not None:
        out["overlong"] = [overlong_reward(int(n), cfg.max_tokens, cfg.cache_tokens) for n in n_tokens]
        weights["overlong"] = cfg.overlong
    for spec, w in zip(cfg.user, cfg.user_weights or [1.0] * len(cfg.user)):
        fn = load_user_reward(spec)
        out[spec] = [call_user_reward(fn, spec, c, p) for c, p in zip(texts, problems)]
        weights[spec] = w
    out["total"] = [sum(weights[k] * out[k][i] for k in weights) for i in range(len(texts))]
    return out
