"""User data as a Task: JSONL, Parquet or a local Hugging Face `datasets` folder with question/answer fields.

Math answers are checked with math-verify (LaTeX, fractions, \\boxed{}), others by normalised exact match.
Bad files fail with one error naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import re
import threading
from pathlib import Path
from typing import Any, Iterator

from nanor1.common import NanoR1Error
from nanor1.tasks.base import Problem, Split, Task, make_problem, parse_split, question_hash, split_of

MAX_MATH_CHARS = 2_000  # longer answers skip math-verify (sympy on huge text is slow) and are compared exactly


class Scorer(str, enum.Enum):
    AUTO = "auto"     # exact match, then math-verify when the reference parses as math
    MATH = "math"
    EXACT = "exact"


# ----------------------------------------------------------------------------- answer checking

_BOXED = re.compile(r"\\boxed\s*\{(.*)\}", re.DOTALL)


def normalize_answer(text: str) -> str:
    """Case, spacing, $...$, \\boxed{} and surrounding punctuation do not change an answer."""
    s = text.strip()
    if m := _BOXED.fullmatch(s):
        s = m.group(1)
    s = " ".join(s.strip().strip("$").split()).lower()
    return s.strip(" .,;:!?'\"")


class _NoTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):  # off the main thread we disable it on purpose
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _math_parse(text: str) -> list:
    from math_verify import parse
    # math-verify's timeout uses signal.alarm, which only works on the main thread (the server scores in others).
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = parse(text, parsing_timeout=timeout)
    if not parsed and "$" not in text and "\\boxed" not in text:
        parsed = parse(f"${text}$", parsing_timeout=timeout)  # bare LaTeX such as x^2 or \frac{1}{2}
    return parsed


def math_equal(reference: str, answer: str) -> bool:
    """math-verify equivalence: 1/2 == 0.5 == \\frac{1}{2} == \\boxed{\\frac12}."""
    from math_verify import verify
    gold, pred = _math_parse(reference), _math_parse(answer)
    if not gold or not pred:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold, pred, timeout_seconds=timeout))


def score_text_answer(answer: str | None, reference: str, scorer: Scorer = Scorer.AUTO) -> float:
    if answer is None:
        return 0.0
    if normalize_answer(answer) == normalize_answer(reference):
        return 1.0
    if scorer == Scorer.EXACT or len(answer) > MAX_MATH_CHARS:
        return 0.0
    return float(math_equal(reference, answer))


# ----------------------------------------------------------------------------- loading

def _field(row: Any, where: str, field: str, kind: str, option: str) -> str:
    if not isinstance(row, dict):
        raise NanoR1Error(f"{where}: expected a JSON object with '{field}', got {type(row).__name__}")
    if field not in row:
        raise NanoR1Error(f"{where}: missing field '{field}' (fields here: {sorted(row)}; "
                          f"set {option}=<name> to use another)")
    value = row[field]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (isinstance(value, str) or (kind == "answer" and is_number)):
        want = "text" if kind == "question" else "text or a number"
        raise NanoR1Error(f"{where}: field '{field}' must be {want}, got {type(value).__name__} {str(value)[:40]!r}")
    value = str(value)
    if not value.strip():
        raise NanoR1Error(f"{where}: field '{field}' is empty")
    return value


def _rows_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NanoR1Error(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSONL") from None
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{k}", json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoR1Error(f"{path}:{k}: not valid JSON ({e.msg} at column {e.colno})") from None


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise NanoR1Error(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    for k, row in enumerate(rows):
        yield f"{path} row {k}", row


def _rows_hf(path: Path) -> dict[str, list[tuple[str, Any]]]:
    """A `datasets.save_to_disk` folder: one Dataset, or a DatasetDict whose splits we keep apart."""
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise NanoR1Error(f"{path}: not a Hugging Face datasets folder saved with save_to_disk "
                          f"({str(e).splitlines()[0][:200]})") from None
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    return {name: [(f"{path} [{name}] row {k}", row) for k, row in enumerate(d)] for name, d in parts.items()}


def load_rows(path: str | Path) -> dict[str, list[tuple[str, Any]]]:
    """{split name: [(where, row)]}; files have one "train" part, datasets folders may have several."""
    path = Path(path)
    if path.is_dir():
        return _rows_hf(path)
    if not path.is_file():
        raise NanoR1Error(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return {"train": list(_rows_jsonl(path))}
    if path.suffix == ".parquet":
        return {"train": list(_rows_parquet(path))}
    raise NanoR1Error(f"{path}: unsupported data file; use .jsonl, .parquet or a datasets folder")


# ----------------------------------------------------------------------------- the task

class FileTask(Task):
    """Problems read from user data. Without an explicit eval set, the split is by question hash."""

    def __init__(self, path: str | Path, question_field: str = "question", answer_field: str = "answer",
                 scorer: str | Scorer = Scorer.AUTO, eval_fraction: float = 0.1, eval_file: str | None = None,
                 size: int | None = None):
        self.path, self.name = Path(path), f"file:{Path(path).name}"
        self.eval_fraction = float(eval_fraction)
        try:
            self.scorer = Scorer(scorer)
        except ValueError:
            raise NanoR1Error(f"task {self.name}: scorer {scorer!r} is not one of "
                              f"{[s.value for s in Scorer]}") from None
        self.description = f"user data {self.path} ({question_field} -> {answer_field}, {self.scorer.value} match)"

        def read(rows: list[tuple[str, Any]], source: Path) -> list[Problem]:
            out = [make_problem(self.name, _field(row, where, question_field, "question", "question_field"),
                                _field(row, where, answer_field, "answer", "answer_field"), source=where)
                   for where, row in rows]
            if not out:
                raise NanoR1Error(f"{source}: no rows; the file is empty")
            return out[:size] if size is not None else out

        parts = load_rows(self.path)
        held_out = [k for k in ("test", "validation", "eval") if k in parts]
        if eval_file is not None:
            eval_parts = load_rows(eval_file)
            evals = read(eval_parts.get("train") or next(iter(eval_parts.values())), Path(eval_file))
        elif held_out and len(parts) > 1:
            evals = read(parts[held_out[0]], self.path)
        else:
            evals = None
        train_key = "train" if "train" in parts else next(k for k in parts if k not in held_out)
        rows = read(parts[train_key], self.path)
        if evals is None:  # one pool: split by hash, so train and eval never share a question
            self._pool = {s: [p for p in rows if split_of(p.question, self.eval_fraction) == s] for s in Split}
        else:  # an explicit eval set: drop training rows whose question appears in it
            banned = {question_hash(p.question) for p in evals}
            self._pool = {Split.TRAIN: [p for p in rows if question_hash(p.question) not in banned],
                          Split.EVAL: evals}

    def generate(self, rng: random.Random) -> Iterator[Problem]:
        yield from self._pool[Split.TRAIN] + self._pool[Split.EVAL]

    def problems(self, split: str | Split, n: int, seed: int = 0, unique: bool = True) -> list[Problem]:
        """A seeded shuffle of the split; a file holds what it holds, so unique=True may return fewer than n."""
        split = parse_split(split)
        pool = list({p.question: p for p in self._pool[split]}.values()) if unique else self._pool[split]
        if not pool:
            raise NanoR1Error(f"{self.path}: no {split.value} problems (of {sum(map(len, self._pool.values()))} "
                              "rows); give eval_file=<path> or a larger eval_fraction")
        rng = random.Random(f"{self.name}:{split.value}:{seed}")
        out: list[Problem] = []
        while len(out) < n:
            order = pool[:]
            rng.shuffle(order)
            out.extend(order[:n - len(out)])
            if unique:
                break
        return out

    def score(self, answer: str | None, problem: Problem) -> float:
        return score_text_answer(answer, problem.answer, self.scorer)
