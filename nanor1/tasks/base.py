"""The Task interface: a named, seeded, splittable stream of problems with a rule-based scorer.

Train/eval splits are decided by a hash of each question, so they can never overlap, whatever the seed,
and an eval set is the same list on every call with the same seed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

from nanor1.common import NanoR1Error


@dataclass(frozen=True)
class Problem:
    id: str             # "<task>:<hash of question>", stable across runs
    question: str
    answer: str         # the reference answer, as text
    task: str
    meta: dict = field(default_factory=dict, compare=False)  # difficulty, the reasoning-gym entry, ...


class Split(str, enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


def parse_split(split: str | Split) -> Split:
    try:
        return Split(split)
    except ValueError:
        raise NanoR1Error(f"unknown split {split!r}; use 'train' or 'eval'") from None


def question_hash(question: str) -> str:
    """sha256 of the question with whitespace runs collapsed (so re-spacing does not move a problem)."""
    return hashlib.sha256(" ".join(question.split()).encode("utf-8", "surrogatepass")).hexdigest()


def split_of(question: str, eval_fraction: float) -> Split:
    """EVAL for the questions whose hash falls in the lowest `eval_fraction` of the hash range."""
    u = int(question_hash(question)[:16], 16) / 2 ** 64
    return Split.EVAL if u < eval_fraction else Split.TRAIN


def make_problem(task: str, question: str, answer: str, **meta: Any) -> Problem:
    return Problem(id=f"{task}:{question_hash(question)[:16]}", question=question, answer=answer,
                   task=task, meta=meta)


_INT = re.compile(r"[-+]?\d+")


def parse_int(answer: str | None) -> int | None:
    """An integer answer as the model may write it: "29", " 29. ", "1,234", "= 29"; anything else is None."""
    if answer is None:
        return None
    s = answer.strip().rstrip(".").strip().lstrip("=").strip().replace(",", "")
    if len(s) > 64 or not _INT.fullmatch(s):
        return None
    return int(s)


class Task(ABC):
    """Subclasses yield an endless (or finite) deterministic stream from `generate(rng)` and score answers."""

    name: str = ""
    description: str = ""
    eval_fraction: float = 0.1
    give_up_after: int = 20_000  # consecutive draws that add nothing before we say the space is too small

    @abstractmethod
    def generate(self, rng: random.Random) -> Iterator[Problem]:
        """Problems drawn with `rng`; the split filter is applied by `problems`."""

    @abstractmethod
    def score(self, answer: str | None, problem: Problem) -> float:
        """1.0 for a correct answer, 0.0 for a wrong or missing one (partial credit allowed in between)."""

    def worked_solution(self, problem: Problem) -> str | None:
        """The step-by-step reasoning text ("3+5=8, 8+8=16, ..."), or None when the task has none."""
        return None

    def fact(self, rng: random.Random) -> str | None:
        """One loose fact for the pretraining corpus ("7+8=15"), or None."""
        return None

    def direct_answer(self, problem: Problem) -> str:
        return problem.answer

    def problems(self, split: str | Split, n: int, seed: int = 0, unique: bool = True) -> list[Problem]:
        """n problems of one split. unique=False allows repeats (for corpora larger than the task space)."""
        split = parse_split(split)
        if n < 0:
            raise NanoR1Error(f"task {self.name}: asked for {n} problems; give a count >= 0")
        rng = random.Random(f"{self.name}:{split.value}:{seed}")
        out: list[Problem] = []
        seen: set[str] = set()
        idle = 0
        for p in self.generate(rng):
            if len(out) >= n:
                break
            if split_of(p.question, self.eval_fraction) != split or (unique and p.question in seen):
                idle += 1
                if idle > self.give_up_after:
                    break
                continue
            idle = 0
            seen.add(p.question)
            out.append(p)
        if len(out) < n:
            raise NanoR1Error(f"task {self.name}: found only {len(out)} distinct {split.value} problems, asked for "
                              f"{n}; raise the difficulty or ask for fewer")
        return out

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def options_to_config(cls, task: str, options: dict[str, Any], levels: tuple[dict, ...] = ()):
    """Build a task's config dataclass from get_task(**options), with one-line errors for bad keys/values.

    `difficulty=k` picks the knob values of levels[k]; knobs given explicitly win over the level's.
    """
    from nanor1.config import from_dict
    options = dict(options)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(names) - ({"difficulty"} if levels else set()))
    if unknown:
        raise NanoR1Error(f"task {task}: unknown option(s) {unknown}; known options: "
                          f"{names + (['difficulty'] if levels else [])}")
    if levels and options.get("difficulty") is not None:
        d = options.pop("difficulty")
        try:
            level = levels[int(d)] if int(d) >= 0 else None
        except (ValueError, TypeError, IndexError):
            level = None
        if level is None:
            raise NanoR1Error(f"task {task}: difficulty {d!r} is not a level 0..{len(levels) - 1}")
        options = {**level, **options}
    options.pop("difficulty", None)
    try:
        return from_dict(cls, options)
    except NanoR1Error as e:
        raise NanoR1Error(f"task {task}: {e}") from None
