"""Can a base model reason on chain_sum yet? Greedy completions after the R1-Zero prompt + " <think>".

Counts, over held-out problems, the chains whose first step is the worked solution's first step and the chains
whose last number is the answer. This is the probe docs/speedrun.md uses to calibrate the base. For chain_sum it
also scores each later step's term look-up, split by whether the term added the step before occurs twice in
the question: a model that finds the next term by matching the previous one (an induction head) fails on the
repeated ones; a model that counts positions does not care. Run:
    python bench/base_probe.py runs/speedrun/base/final [--problems 100] [--terms 8]
"""

import argparse
import re

from nanor1.engine import SamplingParams
from nanor1.policy import load_policy
from nanor1.tasks import get_task
from nanor1.templates import Template, render_prompt
from nanor1.tokenizer import encode_prompt


def greedy_chains(model: str, task, n_problems: int):
    """(policy, held-out problems, greedy completions after the R1-Zero prompt + " <think>")."""
    policy = load_policy(model)
    problems = task.problems("eval", n_problems, 0)
    prompts = [encode_prompt(policy.tokenizer, render_prompt(x.question, Template.R1_ZERO) + " <think>")
               for x in problems]
    return policy, problems, policy.engine(len(prompts)).generate(prompts, SamplingParams(max_new_tokens=80,
                                                                                          temperature=0))


def lookup_hits(outs, problems) -> dict[bool, list[int]]:
    """Steps 2.. of each chain "t+x=..": is x the question's next term? [right, steps], keyed by whether the
    previous term is repeated in the question."""
    hits = {True: [0, 0], False: [0, 0]}
    for o, x in zip(outs, problems):
        xs = [int(t) for t in x.question.split("+")]
        steps = re.findall(r"(\d+)\+(\d+)=", o.text)
        for k in range(1, min(len(steps), len(xs) - 1)):
            repeated = xs.count(xs[k]) > 1
            hits[repeated][0] += int(steps[k][1]) == xs[k + 1]
            hits[repeated][1] += 1
    return hits


def lookup_by_ambiguity(outs, problems) -> str:
    return ", ".join(f"previous term {'repeated' if r else 'unique'} {a}/{n} ({a / max(n, 1):.0%})"
                     for r, (a, n) in lookup_hits(outs, problems).items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--problems", type=int, default=100)
    p.add_argument("--task", default="chain_sum")
    p.add_argument("--terms", type=int, default=0, help="chain_sum's number of terms (0: the task's default)")
    args = p.parse_args()
    task = get_task(args.task, **({"terms": args.terms} if args.terms else {}))
    _, problems, outs = greedy_chains(args.model, task, args.problems)
    firsts = [task.worked_solution(x).split(", ")[0] for x in problems]
    first = sum(o.text.strip().startswith(f) for o, f in zip(outs, firsts))
    right = sum((re.findall(r"\d+", o.text) or ["x"])[-1] == x.answer for o, x in zip(outs, problems))
    print(f"{args.model}: first step copied {first} / {len(problems)}; answer right {right} / {len(problems)}")
    if args.task == "chain_sum":
        print("term look-up per step: " + lookup_by_ambiguity(outs, problems))
    print(f"example: {problems[0].question} -> {outs[0].text!r}")


if __name__ == "__main__":
    main()
