"""Other forms of the chain_sum task and its worked solutions, for the fifth calibration in docs/speedrun.md.

Each form replaces part of the task (or the tokenizer) in this process, then runs a nanor1 command or probes
a base trained with that form:
    python bench/chain_forms.py padded pretrain out_dir=runs/pad-s1 steps=450 n_docs=40000 seed=1 optim.lr=5e-3
    python bench/chain_forms.py padded probe runs/pad-s1/final
    python bench/chain_forms.py rewrite speedrun out_dir=runs/rwsr1 seed=1
Forms (3+5+8+2+7+4 as the example):
    distinct  six different digits per question; worked solution as in nanor1 ("3+5=8, 8+8=16, ...")
    padded    two-digit totals, every step the same width: "03+5=08, 08+8=16, 16+2=18, ..."
    rewrite   the sum rewritten with its head added: "08+8+2+7+4 = 16+2+7+4 = 18+7+4 = 25+4 = 29"
    carried   the rewrite at a fixed width, consumed terms replaced by zeros, so that every step reads its
              operands at the same distance back: "08+8+2+7+4 = 16+2+7+4+0 = 18+7+4+0+0 = 25+4+0+0+0 = 29"
    tight     the same with "=" between the lines instead of " = " (four tokens fewer)
    totals    numbers of up to three digits as one token (GPT-4's and Llama 3's \\p{N}{1,3} rule) and running
              totals only: "3,8,16,18,25,29"
The probe completes 100 held-out problems greedily after the R1-Zero prompt + " <think>" and counts chains
whose first step is right and chains whose reasoning ends in the answer. For the running-total forms it also
counts later steps whose term is the question's next one ("look-up"); for `totals`, the totals that are right.
"""

import functools
import re
import sys

import nanor1.tokenizer as tokenizer_module
from nanor1.tasks import get_task
from nanor1.tasks.arithmetic import ChainSum
from nanor1.tasks.base import make_problem

SEPARATOR = {"distinct": ", ", "padded": ", ", "rewrite": " = ", "carried": " = ", "tight": "=", "totals": ","}


def terms(problem) -> list[int]:
    return [int(x) for x in problem.question.split("+")]


def distinct_terms(self, rng):
    while True:
        xs = rng.sample(range(1, 10), self.cfg.terms)
        yield make_problem(self.name, "+".join(map(str, xs)), str(sum(xs)), terms=xs)


def padded(self, problem):
    xs = terms(problem)
    sums = [sum(xs[:i + 1]) for i in range(len(xs))]
    return ", ".join(f"{a:02d}+{x}={b:02d}" for a, x, b in zip(sums, xs[1:], sums[1:]))


def rewrite(self, problem):
    xs = terms(problem)
    return " = ".join("+".join([f"{sum(xs[:i + 1]):02d}"] + [str(x) for x in xs[i + 1:]]) for i in range(1, len(xs)))


def carried(self, problem, separator=" = "):
    xs = terms(problem)
    width = len(xs) - 2  # terms after the head in the first line
    lines = []
    for i in range(1, len(xs) - 1):
        tail = [str(x) for x in xs[i + 1:]] + ["0"] * (width - len(xs[i + 1:]))
        lines.append("+".join([f"{sum(xs[:i + 1]):02d}"] + tail))
    return separator.join(lines + [str(sum(xs))])


def totals(self, problem):
    xs = terms(problem)
    return ",".join(str(sum(xs[:i + 1])) for i in range(len(xs)))


def apply(form: str) -> None:
    if form == "distinct":
        ChainSum.generate = distinct_terms
    elif form in ("padded", "rewrite", "carried", "tight", "totals"):
        ChainSum.worked_solution = {"padded": padded, "rewrite": rewrite, "carried": carried, "totals": totals,
                                    "tight": functools.partialmethod(carried, separator="=")}[form]
    if form == "totals":
        tokenizer_module.train_tokenizer = functools.partial(tokenizer_module.train_tokenizer, max_digits=3)


def probe(form: str, model: str) -> None:
    # bench/ is on the path when this script runs
    from base_probe import greedy_chains, lookup_hits

    task = get_task("chain_sum")
    _, problems, outs = greedy_chains(model, task, 100)
    first = right = hits = steps = 0
    for o, x in zip(outs, problems):
        reasoning = o.text.split("</think>")[0]
        want = task.worked_solution(x).split(SEPARATOR[form])
        first += reasoning.strip().startswith(want[0])
        right += (re.findall(r"\d+", reasoning) or ["x"])[-1].lstrip("0") == x.answer
        if form == "totals":  # every total after the first
            got = re.findall(r"\d+", reasoning)
            hits += sum(g == w for g, w in zip(got[1:], want[1:]))
            steps += len(want) - 1
    if form in ("distinct", "padded"):  # the term of every step after the first
        hits, steps = map(sum, zip(*lookup_hits(outs, problems).values()))
    what = "totals right" if form == "totals" else "look-up"
    print(f"{model}: first step right {first}/100; reasoning ends in the answer {right}/100"
          + (f"; {what} {hits}/{steps} ({hits / max(steps, 1):.0%})" if steps else ""))
    print(f"example: {problems[0].question} -> {outs[0].text!r}")


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in SEPARATOR:
        sys.exit(f"usage: python bench/chain_forms.py {{{','.join(SEPARATOR)}}} pretrain|speedrun|probe ARGS...")
    form, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    apply(form)
    if command == "probe":
        for model in args:
            probe(form, model)
    else:
        from nanor1.cli import main as cli
        sys.argv = ["nanor1", command, *args]
        cli()


if __name__ == "__main__":
    main()
