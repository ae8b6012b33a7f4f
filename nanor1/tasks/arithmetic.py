"""Built-in procedural tasks sized for tiny models: chain sums, addition, multiplication, countdown, sorting.

Each has a typed config (difficulty knobs), an exact rule-based scorer and a worked-solution renderer
(the step-by-step text the pretraining corpus teaches), e.g. chain_sum "3+5=8, 8+8=16, 16+2=18" for 3+5+8+2.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

from nanor1.common import NanoR1Error
from nanor1.tasks.base import Problem, Task, make_problem, options_to_config, parse_int


def _number(rng: random.Random, digits: int, zero: bool = False) -> int:
    """A number with exactly `digits` digits (1-9 for one digit, or 0-9 when zero=True)."""
    lo = 0 if (zero and digits == 1) else 10 ** (digits - 1)
    return rng.randint(lo, 10 ** digits - 1)


def _check(task: str, **bounds: tuple[int, int, int]) -> None:
    for knob, (value, lo, hi) in bounds.items():
        if not lo <= value <= hi:
            raise NanoR1Error(f"task {task}: {knob}={value} is out of range; use {lo}..{hi}")


class _IntTask(Task):
    """Tasks whose answer is one integer: exact match after light normalisation ("1,234", "29.")."""

    def score(self, answer: str | None, problem: Problem) -> float:
        value = parse_int(answer)
        return float(value is not None and value == int(problem.answer))


# ----------------------------------------------------------------------------- chain_sum

@dataclass
class ChainSumConfig:
    terms: int = 6          # 6 single-digit numbers 1-9 (the speedrun uses 4 two-digit ones: SpeedrunConfig)
    digits: int = 1
    eval_fraction: float = 0.1


class ChainSum(_IntTask):
    name = "chain_sum"
    description = "sum of a chain of numbers, '3+5+8+2+7+4' (terms=6, digits=1; difficulty 0-4)"
    LEVELS = ({"terms": 4, "digits": 1}, {"terms": 6, "digits": 1}, {"terms": 8, "digits": 1},
              {"terms": 4, "digits": 2}, {"terms": 6, "digits": 2})

    def __init__(self, cfg: ChainSumConfig = ChainSumConfig()):
        _check(self.name, terms=(cfg.terms, 2, 32), digits=(cfg.digits, 1, 9))
        self.cfg, self.eval_fraction = cfg, cfg.eval_fraction

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            xs = [_number(rng, self.cfg.digits) for _ in range(self.cfg.terms)]
            yield make_problem(self.name, "+".join(map(str, xs)), str(sum(xs)), terms=xs)

    def worked_solution(self, problem: Problem) -> str:
        """A running total, "3+5=8, 8+8=16, 16+2=18, 18+7=25, 25+4=29": every step is one addition fact right
        before its result, plus a lookup of the question's next term. With pretraining windows that start at
        documents, a 450-step speedrun base completes 98/100 held-out chains in this form (greedy after
        "<think>", bench/base_probe.py), against 45/100 for chains that rewrite the sum ("8+8+2+7+4 = 16+2+7+4
        = ..."), where the operands of each addition sit a line back and the base was often off by one."""
        xs = [int(x) for x in problem.question.split("+")]
        total, steps = xs[0], []
        for x in xs[1:]:
            steps.append(f"{total}+{x}={total + x}")
            total += x
        return ", ".join(steps)

    def fact(self, rng: random.Random) -> str:
        a = rng.randint(1, 9 * self.cfg.terms * 10 ** (self.cfg.digits - 1))
        b = _number(rng, self.cfg.digits)
        return f"{a}+{b}={a + b}"


# ----------------------------------------------------------------------------- addition

@dataclass
class AdditionConfig:
    digits: int = 3
    eval_fraction: float = 0.1


class Addition(_IntTask):
    name = "addition"
    description = "two-number addition by columns with carries, '347+589' (digits=3; difficulty 0-4)"
    LEVELS = tuple({"digits": d} for d in (2, 3, 4, 5, 6))

    def __init__(self, cfg: AdditionConfig = AdditionConfig()):
        _check(self.name, digits=(cfg.digits, 1, 18))
        self.cfg, self.eval_fraction = cfg, cfg.eval_fraction

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            a, b = _number(rng, self.cfg.digits), _number(rng, self.cfg.digits)
            yield make_problem(self.name, f"{a}+{b}", str(a + b))

    def worked_solution(self, problem: Problem) -> str:
        a, b = problem.question.split("+")
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        steps, carry = [], 0
        for da, db in zip(reversed(a), reversed(b)):  # right to left, as taught in school
            s = int(da) + int(db) + carry
            step = f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={s} write {s % 10}"
            carry = s // 10
            steps.append(step + (" carry 1" if carry else ""))
        if carry:
            steps.append("write 1")
        return ", ".join(steps)

    def fact(self, rng: random.Random) -> str:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}={a + b}"


# ----------------------------------------------------------------------------- multiplication

@dataclass
class MultiplicationConfig:
    digits_a: int = 3      # 3x1 digits: 8,100 questions, enough for a 10% eval split of several hundred
    digits_b: int = 1
    eval_fraction: float = 0.1


class Multiplication(_IntTask):
    name = "multiplication"
    description = "multiplication by partial products, '347*8' (digits_a=3, digits_b=1; difficulty 0-4)"
    LEVELS = ({"digits_a": 2, "digits_b": 1}, {"digits_a": 3, "digits_b": 1}, {"digits_a": 2, "digits_b": 2},
              {"digits_a": 3, "digits_b": 2}, {"digits_a": 4, "digits_b": 3})

    def __init__(self, cfg: MultiplicationConfig = MultiplicationConfig()):
        _check(self.name, digits_a=(cfg.digits_a, 1, 12), digits_b=(cfg.digits_b, 1, 12))
        self.cfg, self.eval_fraction = cfg, cfg.eval_fraction

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            a, b = _number(rng, self.cfg.digits_a), _number(rng, self.cfg.digits_b)
            yield make_problem(self.name, f"{a}*{b}", str(a * b))

    def worked_solution(self, problem: Problem) -> str:
        a, b = (int(x) for x in problem.question.split("*"))
        # Split the longer factor by place value: 47*8 = 40*8 + 7*8; 47*36 = 47*30 + 47*6.
        split_a = len(str(a)) >= len(str(b))
        digits = str(a if split_a else b)
        places = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]
        steps, parts = [], []
        for p in places:
            x, y = (p, b) if split_a else (a, p)
            steps.append(f"{x}*{y}={x * y}")
            parts.append(x * y)
        acc = parts[0]
        for p in parts[1:]:
            steps.append(f"{acc}+{p}={acc + p}")
            acc += p
        return ", ".join(steps)

    def fact(self, rng: random.Random) -> str:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        k = 10 ** rng.randint(0, self.cfg.digits_a - 1)
        return f"{a * k}*{b}={a * k * b}"


# ----------------------------------------------------------------------------- countdown

@dataclass
class CountdownConfig:
    terms: int = 3          # how many numbers must each be used exactly once
    digits: int = 1
    eval_fraction: float = 0.1


_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
        ast.Div: lambda x, y: x / y}
_APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y, "/": lambda x, y: x // y}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression of integers and + - * / (no other syntax is accepted)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError("unsupported syntax")


class Countdown(Task):
    name = "countdown"
    description = "reach a target with + - * / using each number once, 'Use 3 5 7 to make 22' (terms=3, digits=1)"
    LEVELS = ({"terms": 3, "digits": 1}, {"terms": 4, "digits": 1}, {"terms": 3, "digits": 2},
              {"terms": 4, "digits": 2}, {"terms": 5, "digits": 2})

    def __init__(self, cfg: CountdownConfig = CountdownConfig()):
        _check(self.name, terms=(cfg.terms, 2, 8), digits=(cfg.digits, 1, 3))
        self.cfg, self.eval_fraction = cfg, cfg.eval_fraction

    def _chain(self, rng: random.Random) -> tuple[list[int], list[str]]:
        """Numbers in solution order and the ops joining them; every intermediate is a positive integer."""
        xs = [_number(rng, self.cfg.digits) for _ in range(self.cfg.terms)]
        acc, ops = xs[0], []
        for x in xs[1:]:
            choices = ["+", "*"] + (["-"] if acc > x else []) + (["/"] if x > 1 and acc % x == 0 else [])
            op = rng.choice(choices)
            acc = _APPLY[op](acc, x)
            ops.append(op)
        return xs, ops

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            xs, ops = self._chain(rng)
            expr, acc = str(xs[0]), xs[0]
            for op, x in zip(ops, xs[1:]):
                if op in "*/" and any(c in expr for c in "+-"):
                    expr = f"({expr})"
                expr += f"{op}{x}"
                acc = _APPLY[op](acc, x)
            shown = xs[:]
            rng.shuffle(shown)
            yield make_problem(self.name, f"Use {' '.join(map(str, shown))} to make {acc}", expr,
                               numbers=shown, target=acc)

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None or len(answer) > 200:
            return 0.0
        expr = answer.replace("×", "*").replace("÷", "/").split("=")[0].strip()
        try:
            used: list[int] = []
            value = _evaluate(ast.parse(expr, mode="eval").body, used)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
            return 0.0
        numbers, target = problem.meta.get("numbers"), problem.meta.get("target")
        if numbers is None:  # a Problem rebuilt without meta: read the question back
            m = re.fullmatch(r"Use ([\d ]+) to make (\d+)", problem.question)
            numbers, target = [int(x) for x in m.group(1).split()], int(m.group(2))
        return float(Counter(used) == Counter(numbers) and value == target)

    def worked_solution(self, problem: Problem) -> str:
        # Re-evaluate the reference expression left to right (it is a left-leaning chain by construction).
        tokens = re.findall(r"\d+|[-+*/]", problem.answer)
        acc, steps = int(tokens[0]), []
        for op, x in zip(tokens[1::2], map(int, tokens[2::2])):
            new = _APPLY[op](acc, x)
            steps.append(f"{acc}{op}{x}={new}")
            acc = new
        return ", ".join(steps)

    def fact(self, rng: random.Random) -> str:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        op = rng.choice("+-*")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        return f"{a}{op}{b}={_APPLY[op](a, b)}"


# ----------------------------------------------------------------------------- sorting

@dataclass
class SortingConfig:
    terms: int = 5
    digits: int = 2         # numbers 0..10**digits - 1
    eval_fraction: float = 0.1


_LIST = re.compile(r"\s*\[?\s*(-?\d+(?:\s*[,;]?\s*-?\d+)*)\s*\]?\s*\.?\s*")


class Sorting(Task):
    name = "sorting"
    description = "sort numbers ascending, 'sort 34 7 91 12 5' -> '5 7 12 34 91' (terms=5, digits=2)"
    LEVELS = ({"terms": 4, "digits": 1}, {"terms": 5, "digits": 2}, {"terms": 6, "digits": 2},
              {"terms": 8, "digits": 2}, {"terms": 10, "digits": 3})

    def __init__(self, cfg: SortingConfig = SortingConfig()):
        _check(self.name, terms=(cfg.terms, 2, 64), digits=(cfg.digits, 1, 9))
        self.cfg, self.eval_fraction = cfg, cfg.eval_fraction

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        while True:
            xs = [_number(rng, rng.randint(1, self.cfg.digits), zero=True) for _ in range(self.cfg.terms)]
            yield make_problem(self.name, "sort " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs))))

    def score(self, answer: str | None, problem: Problem) -> float:
        if answer is None or len(answer) > 10_000 or not (m := _LIST.fullmatch(answer)):
            return 0.0
        return float(re.findall(r"-?\d+", m.group(1)) == problem.answer.split())

    def worked_solution(self, problem: Problem) -> str:
        # Selection sort: repeatedly take the smallest of what is left.
        left, steps = [int(x) for x in problem.question.split()[1:]], []
        while len(left) > 1:
            m = min(left)
            steps.append(f"min({' '.join(map(str, left))})={m}")
            left.remove(m)
        steps.append(f"{left[0]} left")
        return ", ".join(steps)

    def fact(self, rng: random.Random) -> str:
        a, b = rng.sample(range(10 ** self.cfg.digits), 2)
        return f"{min(a, b)}<{max(a, b)}"


BUILTINS: dict[str, tuple[type[Task], type]] = {
    t.name: (t, c) for t, c in [(ChainSum, ChainSumConfig), (Addition, AdditionConfig),
                                (Multiplication, MultiplicationConfig), (Countdown, CountdownConfig),
                                (Sorting, SortingConfig)]}


def make_builtin(name: str, **options) -> Task:
    cls, cfg_cls = BUILTINS[name]
    return cls(options_to_config(cfg_cls, name, options, cls.LEVELS))
