"""Decontamination: n-gram overlap between a training set and an evaluation set (as in GPT-3's 13-gram check).

`ngram_overlap(train_texts, eval_texts)` reports which eval texts share an n-gram with any training text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")  # words and single symbols, so "3+5" and "3*5" differ


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class Overlap:
    eval_index: int
    train_index: int
    ngram: str


@dataclass
class OverlapReport:
    n: int
    n_train: int
    n_eval: int
    contaminated: list[int] = field(default_factory=list)   # eval indices sharing an n-gram with training
    examples: list[Overlap] = field(default_factory=list)   # up to max_examples, one per contaminated eval text

    @property
    def n_contaminated(self) -> int:
        return len(self.contaminated)

    @property
    def fraction(self) -> float:
        return self.n_contaminated / self.n_eval if self.n_eval else 0.0

    def summary(self) -> str:
        lines = [f"{self.n_contaminated}/{self.n_eval} eval texts ({100 * self.fraction:.1f}%) share a "
                 f"{self.n}-gram with the {self.n_train} training texts"]
        lines += [f"  eval #{o.eval_index} ~ train #{o.train_index}: {o.ngram!r}" for o in self.examples]
        return "\n".join(lines)


def ngram_overlap(train_texts: Sequence[str], eval_texts: Sequence[str], n: int = 13,
                  max_examples: int = 10) -> OverlapReport:
    """Eval texts shorter than n tokens are checked whole: contaminated if their full token sequence
    appears contiguously in a training text (so short arithmetic questions are still caught)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    eval_tokens = [_tokens(t) for t in eval_texts]
    lengths = {min(n, len(t)) for t in eval_tokens if t}
    # gram length -> hash(gram) -> first train index; 64-bit hashes keep big corpora in memory
    index: dict[int, dict[int, int]] = {k: {} for k in lengths}
    for i, text in enumerate(train_texts):
        toks = _tokens(text)
        for k in lengths:
            for g in _grams(toks, k):
                index[k].setdefault(hash(g), i)
    report = OverlapReport(n=n, n_train=len(train_texts), n_eval=len(eval_texts))
    for j, toks in enumerate(eval_tokens):
        if not toks:
            continue
        k = min(n, len(toks))
        hit = next((g for g in sorted(_grams(toks, k)) if hash(g) in index[k]), None)
        if hit is not None:
            report.contaminated.append(j)
            if len(report.examples) < max_examples:
                report.examples.append(Overlap(j, index[k][hash(hit)], " ".join(hit)))
    return report
