"""Pretraining corpus and cold-start SFT data generated from a task's training split.

The mix follows the measured speedrun (/work/shared/SPEEDRUN-NOTES.md): direct answers, worked solutions,
R1-Zero-tagged documents (so the base model sometimes samples the format GRPO must reinforce) and loose facts.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, fields

from nanor1.common import NanoR1Error
from nanor1.tasks.base import Problem, Task
from nanor1.templates import Template, render_prompt


class DocKind(enum.Enum):
    DIRECT = "direct"                      # Q: 3+5+8+2+7+4\nA: 29
    WORKED = "worked"                      # Q: ...\nA: 3+5=8, 8+8=16, ..., 25+4=29, 29   (a few styles)
    TAGGED_DIRECT = "tagged_direct"        # <R1-Zero prompt> <answer>29</answer>
    TAGGED_REASONING = "tagged_reasoning"  # <R1-Zero prompt> <think> 3+5=8, ..., 25+4=29 </think> <answer>29</answer>
    FACTS = "facts"                        # 7+8=15\n16+2=18\n...


@dataclass
class CorpusMix:
    """Shares of each document kind: the speedrun's mix. The tagged shares set how often the base answers the
    R1-Zero prompt by reasoning: 10% / 10% gave a base that reasoned in 45-66% of its samples, too often to stay
    below 40% once it reasons well; 15% / 5% gives ~12% (docs/speedrun.md, eighth calibration), rare enough
    for R1-Zero to have a habit to change and common enough for GRPO to find (in the feasibility notes a 5%
    share that the base never sampled left GRPO's rewards flat at "format only")."""
    direct: float = 0.30
    worked: float = 0.25
    tagged_direct: float = 0.15
    tagged_reasoning: float = 0.05
    facts: float = 0.25

    def validate(self) -> None:
        shares = [getattr(self, f.name) for f in fields(self)]
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise NanoR1Error(f"corpus mix {self}: shares must be >= 0 with a positive sum")


_WORKED_STYLES = (
    "Q: {q}\nA: {w}, {a}",
    "Q: {q}\nA: {w}. So the answer is {a}.",
    "Problem: {q}\nSolution: {w}.\nAnswer: {a}",
    "{q} = ? Step by step: {w}. Result: {a}",
)


def render_document(kind: DocKind, problem: Problem, worked: str | None, rng: random.Random) -> str:
    q, a = problem.question, problem.answer
    if kind is DocKind.DIRECT:
        return f"Q: {q}\nA: {a}"
    if kind is DocKind.WORKED:
        return rng.choice(_WORKED_STYLES).format(q=q, w=worked, a=a)
    if kind is DocKind.TAGGED_DIRECT:
        return render_prompt(q, Template.R1_ZERO) + f" <answer>{a}</answer>"
    if kind is DocKind.TAGGED_REASONING:
        return render_prompt(q, Template.R1_ZERO) + f" <think> {worked} </think> <answer>{a}</answer>"
    raise ValueError(f"{kind} documents are not rendered from a problem")


def _counts(shares: dict[DocKind, float], n: int) -> dict[DocKind, int]:
    """Largest-remainder rounding, so the counts sum to n exactly."""
    total = sum(shares.values())
    raw = {k: n * v / total for k, v in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:n - sum(counts.values())]:
        counts[k] += 1
    return counts


def pretrain_documents(task: Task, n_docs: int, seed: int, mix: CorpusMix | None = None) -> list[str]:
    """n_docs documents from the task's train split, shuffled. Tasks without worked solutions (reasoning-gym,
    user files) move the worked/tagged-reasoning shares to direct/tagged-direct, and facts to direct."""
    mix = mix or CorpusMix()
    mix.validate()
    shares = {k: getattr(mix, k.value) for k in DocKind}
    rng = random.Random(f"corpus:{task.name}:{seed}")
    probe = task.problems("train", 1, seed)[0]
    if not probe.answer:
        raise NanoR1Error(f"task {task.name} has no reference answers (its scorer verifies solutions), so it "
                          "cannot make pretraining documents; use a task with answers")
    if task.worked_solution(probe) is None:
        shares[DocKind.DIRECT] += shares.pop(DocKind.WORKED)
        shares[DocKind.TAGGED_DIRECT] += shares.pop(DocKind.TAGGED_REASONING)
    if task.fact(random.Random(0)) is None:
        shares[DocKind.DIRECT] += shares.pop(DocKind.FACTS)
    if sum(shares.values()) <= 0:
        raise NanoR1Error(f"corpus mix {mix} leaves no document kind that task {task.name} can render")
    counts = _counts(shares, n_docs)
    kinds = [k for k, c in counts.items() if k is not DocKind.FACTS for _ in range(c)]
    problems = task.problems("train", len(kinds), seed, unique=False)
    docs = [render_document(k, p, task.worked_solution(p) if k in (DocKind.WORKED, DocKind.TAGGED_REASONING)
                            else None, rng) for k, p in zip(kinds, problems)]
    for _ in range(counts.get(DocKind.FACTS, 0)):
        docs.append("\n".join(task.fact(rng) for _ in range(rng.randint(4, 8))))
    rng.shuffle(docs)
    return docs


def sft_answer(worked: str, answer: str) -> str:
    """The assistant turn of cold-start SFT data: reasoning then answer, in the tags the rewards check."""
    return f"<think>{worked}</think><answer>{answer}</answer>"


def sft_examples(task: Task, n: int, seed: int) -> list[dict]:
    """Cold-start chat examples (R1 section 2.3.1) from train-split problems with worked solutions."""
    out = []
    for p in task.problems("train", n, seed, unique=False):
        worked = task.worked_solution(p)
        if worked is None:
            raise NanoR1Error(f"task {task.name} has no worked solutions to build SFT data from; "
                              "collect traces with rejection sampling instead")
        out.append({"messages": [{"role": "user", "content": p.question},
                                 {"role": "assistant", "content": sft_answer(worked, p.answer)}]})
    return out


def tokenizer_training_texts(task: Task, n_docs: int, seed: int) -> list[str]:
    """The pretraining corpus plus chat-rendered SFT examples, so the BPE merges cover both formats."""
    from nanor1.tokenizer import render_chat
    texts = pretrain_documents(task, n_docs, seed)
    try:
        texts += [render_chat(ex["messages"], add_generation_prompt=False)
                  for ex in sft_examples(task, max(1, n_docs // 10), seed)]
    except NanoR1Error:  # tasks without worked solutions have no SFT data; the corpus alone is fine
        pass
    return texts
