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
    totals    numbers of up to three digits as one token (GPT-4's and Llama 3's \\p{N}{1,3} rule) and running
              totals only: "3,8,16,18,25,29"
The probe completes 100 held-out problems greedily after the R1-Zero prompt + " <think>" and counts chains
whose first step is right and chains whose reasoning ends in the answer. For the running-total forms it also
counts later steps whose term is the question's next one ("look-up"); for `totals`, the totals that are right.
"""

import re
import sys

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTok

import nanor1.tokenizer as tokenizer_module
from nanor1.tasks.arithmetic import ChainSum
from nanor1.tasks.base import make_problem

SEPARATOR = {"distinct": ", ", "padded": ", ", "rewrite": " = ", "totals": ","}


def distinct_terms(self, rng):
    while True:
        xs = rng.sample(range(1, 10), self.cfg.terms)
        yield make_problem(self.name, "+".join(map(str, xs)), str(sum(xs)), terms=xs)


def padded(self, problem):
    xs = [int(x) for x in problem.question.split("+")]
    sums = [sum(xs[:i + 1]) for i in range(len(xs))]
    return ", ".join(f"{a:02d}+{x}={b:02d}" for a, x, b in zip(sums, xs[1:], sums[1:]))


def rewrite(self, problem):
    xs = [int(x) for x in problem.question.split("+")]
    return " = ".join("+".join([f"{sum(xs[:i + 1]):02d}"] + [str(x) for x in xs[i + 1:]]) for i in range(1, len(xs)))


def totals(self, problem):
    xs = [int(x) for x in problem.question.split("+")]
    return ",".join(str(sum(xs[:i + 1])) for i in range(len(xs)))


def train_tokenizer_number_tokens(texts, vocab_size, merge_across_words=False):
    """nanor1.tokenizer.train_tokenizer with digits grouped up to three per pre-token instead of one."""
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\s+\z"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_words)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((t for t in texts if t), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in tokenizer_module.SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer_module.Tokenizer(tok)


def apply(form: str) -> None:
    if form == "distinct":
        ChainSum.generate = distinct_terms
    elif form in ("padded", "rewrite", "totals"):
        ChainSum.worked_solution = {"padded": padded, "rewrite": rewrite, "totals": totals}[form]
    if form == "totals":
        tokenizer_module.train_tokenizer = train_tokenizer_number_tokens


def probe(form: str, model: str) -> None:
    from nanor1.engine import SamplingParams
    from nanor1.policy import load_policy
    from nanor1.tasks import get_task
    from nanor1.templates import Template, render_prompt
    policy, task = load_policy(model), get_task("chain_sum")
    problems = task.problems("eval", 100, 0)
    prompts = [tokenizer_module.encode_prompt(policy.tokenizer, render_prompt(x.question, Template.R1_ZERO) + " <think>")
               for x in problems]
    outs = policy.engine(len(prompts)).generate(prompts, SamplingParams(max_new_tokens=80, temperature=0))
    first = right = hits = steps = 0
    for o, x in zip(outs, problems):
        reasoning = o.text.split("</think>")[0]
        want = task.worked_solution(x).split(SEPARATOR[form])
        first += reasoning.strip().startswith(want[0])
        right += (re.findall(r"\d+", reasoning) or ["x"])[-1].lstrip("0") == x.answer
        xs = [int(t) for t in x.question.split("+")]
        if form == "totals":  # every total after the first
            got = re.findall(r"\d+", reasoning)
            hits += sum(g == w for g, w in zip(got[1:], want[1:]))
            steps += len(want) - 1
        elif form != "rewrite":  # the term of every step after the first
            found = re.findall(r"(\d+)\+(\d+)=", reasoning)
            for k in range(1, min(len(found), len(xs) - 1)):
                hits += int(found[k][1]) == xs[k + 1]
                steps += 1
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
