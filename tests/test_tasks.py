"""Tasks: built-in generators and scorers, reasoning-gym, user files, disjoint splits, decontamination."""

import json
import random
import re
import threading

import pytest

from nanor1.common import NanoR1Error
from nanor1.tasks import format_task_list, get_task, list_tasks, ngram_overlap
from nanor1.tasks.base import Split, make_problem, parse_int, split_of
from nanor1.tasks.files import math_equal

BUILTINS = ["chain_sum", "addition", "multiplication", "countdown", "sorting"]


# ----------------------------------------------------------------------------- built-ins

def test_chain_sum_default_is_the_speedrun_task():
    task = get_task("chain_sum")
    for p in task.problems("train", 200):
        assert re.fullmatch(r"[1-9](\+[1-9]){5}", p.question)
        assert int(p.answer) == sum(int(x) for x in p.question.split("+"))
        assert task.score(p.answer, p) == 1.0 and task.direct_answer(p) == p.answer


def test_chain_sum_worked_solution():
    p = make_problem("chain_sum", "3+5+8+2+7+4", "29")
    assert get_task("chain_sum").worked_solution(p) == "3+5=8, 8+8=16, 16+2=18, 18+7=25, 25+4=29"


def _check_steps(text):
    """Every 'a op b (op c) = d' step in a worked solution is true arithmetic; returns the last result."""
    last = None
    for expr, c in re.findall(r"((?:\d+[-+*/])+\d+)=(\d+)", text):
        assert eval(expr) == int(c), text   # digits and operators only, by the regex
        last = int(c)
    assert last is not None, text
    return last


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_reference_answers_and_worked_solutions(name):
    task = get_task(name)
    for p in task.problems("train", 50, seed=3):
        assert task.score(p.answer, p) == 1.0
        assert task.score(None, p) == 0.0 and task.score("", p) == 0.0 and task.score("banana", p) == 0.0
        worked = task.worked_solution(p)
        assert worked and "\n" not in worked
        assert re.search(r"\d", task.fact(random.Random(0)))
        if name == "sorting":   # selection sort: each min is right, and the mins in order are the answer
            steps = re.findall(r"min\(([\d ]+)\)=(\d+)", worked)
            assert all(min(map(int, xs.split())) == int(m) for xs, m in steps)
            assert [m for _, m in steps] + [worked.split()[-2]] == p.answer.split()
            continue
        if name == "chain_sum":  # a running total: each step adds the question's next term to the last total
            steps = [re.fullmatch(r"(\d+)\+(\d+)=(\d+)", s).groups() for s in worked.split(", ")]
            terms = p.question.split("+")
            assert [s[1] for s in steps] == terms[1:] and steps[0][0] == terms[0]
            assert all(prev[2] == cur[0] for prev, cur in zip(steps, steps[1:]))
        last = _check_steps(worked)
        if name in ("multiplication", "countdown", "chain_sum"):
            assert str(last) == (p.answer if name != "countdown" else str(p.meta["target"]))


def test_addition_worked_solution_writes_the_answer_digits():
    task = get_task("addition")
    for p in task.problems("train", 100):
        digits = re.findall(r"write (\d)", task.worked_solution(p))
        assert "".join(reversed(digits)) == p.answer
    p = make_problem("addition", "457+760", "1217")
    assert task.worked_solution(p) == "7+0=7 write 7, 5+6=11 write 1 carry 1, 4+7+1=12 write 2 carry 1, write 1"


@pytest.mark.parametrize("name", BUILTINS)
def test_splits_never_overlap_and_eval_is_stable(name):
    task = get_task(name)
    train = task.problems("train", 2000, seed=0)
    evals = task.problems("eval", 100, seed=0)
    assert not {p.question for p in train} & {p.question for p in evals}
    assert all(split_of(p.question, task.eval_fraction) is Split.EVAL for p in evals)
    assert [p.id for p in evals] == [p.id for p in get_task(name).problems("eval", 100, seed=0)]
    assert len({p.question for p in evals}) == 100
    assert [p.id for p in evals] != [p.id for p in task.problems("eval", 100, seed=1)]


def test_difficulty_knobs_and_option_errors():
    p = get_task("chain_sum", difficulty=3).problems("train", 1)[0]          # level 3: 4 terms of 2 digits
    assert re.fullmatch(r"\d\d(\+\d\d){3}", p.question)
    p = get_task("chain_sum", difficulty=3, terms="2").problems("train", 1)[0]   # explicit knob wins
    assert re.fullmatch(r"\d\d\+\d\d", p.question)
    p = get_task("multiplication", digits_a=2, digits_b=2).problems("train", 1)[0]
    assert re.fullmatch(r"\d\d\*\d\d", p.question)
    for opts, msg in [({"foo": 1}, "unknown option"), ({"terms": "x"}, "not a number"),
                      ({"difficulty": 9}, "not a level"), ({"terms": 1}, "out of range")]:
        with pytest.raises(NanoR1Error, match=msg):
            get_task("chain_sum", **opts)
    with pytest.raises(NanoR1Error, match="found only"):                       # 81 questions in all
        get_task("addition", digits=1).problems("eval", 50)
    with pytest.raises(NanoR1Error, match="unknown split"):
        get_task("chain_sum").problems("test", 1)
    with pytest.raises(NanoR1Error, match="unknown task"):
        get_task("chain_summ")


@pytest.mark.parametrize("answer, value", [("29", 29), (" 29. ", 29), ("1,234", 1234), ("= 29", 29),
                                           ("-7", -7), ("29 apples", None), ("2 9", None), ("", None),
                                           (None, None), ("9" * 100, None)])
def test_parse_int(answer, value):
    assert parse_int(answer) == value


def test_countdown_scorer_accepts_any_valid_expression():
    task = get_task("countdown")
    p = make_problem("countdown", "Use 3 5 7 to make 22", "3*5+7", numbers=[3, 5, 7], target=22)
    for good in ["3*5+7", "7+5*3", "(5*3)+7", " 7 + 3 * 5 = 22", "3×5+7"]:
        assert task.score(good, p) == 1.0, good
    for bad in ["3*5+7+0", "3*5*7", "15+7", "3*5", "7+7+7+1", "__import__('os')", "3/(5-5)+7", "3**5",
                "(" * 500 + "3" + ")" * 500, "x"]:
        assert task.score(bad, p) == 0.0, bad
    # Problems rebuilt without meta (e.g. read back from a log) still score.
    assert task.score("7+3*5", make_problem("countdown", "Use 3 5 7 to make 22", "3*5+7")) == 1.0


def test_sorting_scorer():
    task = get_task("sorting")
    p = make_problem("sorting", "sort 34 7 91 12 5", "5 7 12 34 91")
    for good in ["5 7 12 34 91", "5, 7, 12, 34, 91", "[5, 7, 12, 34, 91]"]:
        assert task.score(good, p) == 1.0
    for bad in ["91 34 12 7 5", "5 7 12 34", "5 7 12 34 91 91", "the list is 5 7 12 34 91"]:
        assert task.score(bad, p) == 0.0


# ----------------------------------------------------------------------------- reasoning-gym

def test_list_tasks_has_builtins_and_every_reasoning_gym_dataset():
    from reasoning_gym.factory import DATASETS
    names = [n for n, _ in list_tasks()]
    assert names[:5] == BUILTINS
    assert {n for n in names if n.startswith("rg:")} == {f"rg:{n}" for n in DATASETS}
    text = format_task_list()
    assert "chain_sum" in text and "rg:basic_arithmetic" in text and "rg:zebra_puzzles" in text


def test_reasoning_gym_task_generates_renders_and_scores():
    from nanor1.templates import Template, render_prompt
    task = get_task("rg:basic_arithmetic")
    train, evals = task.problems("train", 30), task.problems("eval", 10)
    assert not {p.question for p in train} & {p.question for p in evals}
    for p in evals:
        assert task.score(p.answer, p) == 1.0 and task.score(None, p) == 0.0
        assert p.meta["entry"]["question"] == p.question
        assert render_prompt(p.question, Template.R1_ZERO).endswith(f"User: {p.question}. Assistant:")
    assert task.score(str(int(float(evals[0].answer)) + 1), evals[0]) == 0.0
    assert task.worked_solution(evals[0]) is None


def test_reasoning_gym_options():
    task = get_task("rg:chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    for p in task.problems("train", 10):
        assert p.meta["entry"]["metadata"]["num_terms"] == 2
    easy = get_task("rg:chain_sum", difficulty=0).problems("train", 20)
    assert all(p.meta["entry"]["metadata"]["num_digits"] == 1 for p in easy)
    assert get_task("rg:chain_sum", min_terms="3", max_terms="3").problems("train", 1)[0].meta["entry"][
        "metadata"]["num_terms"] == 3                                        # CLI strings are coerced
    with pytest.raises(NanoR1Error, match="unknown reasoning-gym task"):
        get_task("rg:no_such_task")
    with pytest.raises(NanoR1Error, match="unknown option"):
        get_task("rg:chain_sum", bogus=1)
    with pytest.raises(NanoR1Error, match="rg:chain_sum"):
        get_task("rg:chain_sum", min_terms=5, max_terms=2)


# ----------------------------------------------------------------------------- user files

def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_task_scoring_math_and_text(tmp_path):
    rows = [{"question": f"q{i}", "answer": "1/2"} for i in range(40)] + [{"question": "capital?", "answer": "Paris"},
                                                                        {"question": "n?", "answer": 42}]
    task = get_task(str(_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.5)
    everything = task.problems("train", 100) + task.problems("eval", 100)
    assert len(everything) == 42 and not {p.question for p in task.problems("train", 100)} & \
        {p.question for p in task.problems("eval", 100)}
    by_q = {p.question: p for p in everything}
    half, paris, n = by_q["q0"], by_q["capital?"], by_q["n?"]
    for ans in ["1/2", "0.5", "\\frac{1}{2}", "\\boxed{\\frac12}", "$\\frac{1}{2}$"]:
        assert task.score(ans, half) == 1.0, ans
    assert task.score("1/3", half) == 0.0 and task.score(None, half) == 0.0
    assert task.score(" paris. ", paris) == 1.0 and task.score("London", paris) == 0.0
    assert n.answer == "42" and task.score("42.0", n) == 1.0
    exact = get_task(str(tmp_path / "d.jsonl"), scorer="exact", eval_fraction=0.5)
    assert exact.score("0.5", half) == 0.0


def test_math_verify_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("\\frac{1}{2}", "0.5")))
    t.start(), t.join()
    assert out == [True]


@pytest.mark.parametrize("content, message", [
    ("", "no rows; the file is empty"),
    ("\n\n", "no rows; the file is empty"),
    ('{"question": "a", "answer": "b"}\n{"question": "c"}', r"d\.jsonl:2: missing field 'answer'"),
    ('{"question": "a", "answer": "b"}\n{oops', r"d\.jsonl:2: not valid JSON"),
    ('["a", "b"]', r"d\.jsonl:1: expected a JSON object"),
    ('{"question": "a", "answer": [1]}', r"d\.jsonl:1: field 'answer' must be text or a number, got list"),
    ('{"question": 5, "answer": "1"}', r"d\.jsonl:1: field 'question' must be text, got int"),
    ('{"question": "a", "answer": true}', r"d\.jsonl:1: field 'answer' must be text or a number, got bool"),
    ('{"question": "  ", "answer": "1"}', r"d\.jsonl:1: field 'question' is empty"),
])
def test_bad_jsonl_files_fail_with_file_line_and_field(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(NanoR1Error, match=message):
        get_task(str(tmp_path / "d.jsonl"))


def test_file_option_errors(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"problem": "a", "solution": "1"}])
    with pytest.raises(NanoR1Error, match="set question_field=<name>"):
        get_task(str(path))
    task = get_task(str(path), question_field="problem", answer_field="solution", eval_fraction=0.0)
    assert task.problems("train", 5)[0].answer == "1"
    with pytest.raises(NanoR1Error, match="no eval problems"):
        task.problems("eval", 5)
    with pytest.raises(NanoR1Error, match="unknown option"):
        get_task(str(path), colour="red")
    with pytest.raises(NanoR1Error, match="scorer"):
        get_task(str(path), question_field="problem", answer_field="solution", scorer="fuzzy")
    with pytest.raises(NanoR1Error, match="file not found"):
        get_task(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(NanoR1Error, match="not UTF-8"):
        get_task(str(tmp_path / "bin.jsonl"))


def test_eval_file_is_kept_apart(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(20)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(15, 25)])
    task = get_task(str(train), eval_file=str(evals))
    assert {p.question for p in task.problems("eval", 100)} == {f"q{i}" for i in range(15, 25)}
    assert {p.question for p in task.problems("train", 100)} == {f"q{i}" for i in range(15)}
    assert len(task.problems("train", 40, unique=False)) == 40     # repeats allowed on request


def test_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"question": [f"q{i}" for i in range(30)], "answer": [str(i) for i in range(30)]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    task = get_task(str(tmp_path / "d.parquet"), eval_fraction=0.3)
    assert len(task.problems("train", 100)) + len(task.problems("eval", 100)) == 30
    pq.write_table(pa.table({"question": ["a"], "label": ["b"]}), tmp_path / "bad.parquet")
    with pytest.raises(NanoR1Error, match=r"bad\.parquet row 0: missing field 'answer'"):
        get_task(str(tmp_path / "bad.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(NanoR1Error, match="not a readable Parquet"):
        get_task(str(tmp_path / "junk.parquet"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict({"question": ["t1", "q3"], "answer": ["x", "3"]})})
    dd.save_to_disk(str(tmp_path / "hf"))
    task = get_task(str(tmp_path / "hf"))
    assert {p.question for p in task.problems("eval", 10)} == {"t1", "q3"}
    assert "q3" not in {p.question for p in task.problems("train", 100)}
    with pytest.raises(NanoR1Error, match="not a Hugging Face datasets folder"):
        get_task(str(tmp_path))


# ----------------------------------------------------------------------------- decontamination

def test_ngram_overlap_finds_planted_overlap():
    sentence = "the quick brown fox jumps over the lazy dog while the cat sleeps on the mat"
    train = ["nothing to see here at all", f"prefix words {sentence} suffix"]
    evals = ["a completely different question about arithmetic and numbers that is long enough", sentence,
             "3+5+8+2+7+4"]
    report = ngram_overlap(train + ["Q: 3+5+8+2+7+4\nA: 29"], evals, n=13)
    assert report.contaminated == [1, 2] and report.n_contaminated == 2
    assert report.fraction == pytest.approx(2 / 3)
    assert report.examples[0].train_index == 1 and len(report.examples[0].ngram.split()) == 13
    assert report.examples[1].train_index == 2        # short text checked whole
    assert "2/3 eval texts" in report.summary()
    assert ngram_overlap(train, ["3*5+8+2+7+4"]).n_contaminated == 0   # symbols count: '*' is not '+'


def test_task_splits_are_decontaminated():
    task = get_task("chain_sum")
    train = [p.question for p in task.problems("train", 3000)]
    evals = [p.question for p in task.problems("eval", 200)]
    assert ngram_overlap(train, evals).n_contaminated == 0


def test_reasoning_gym_task_without_reference_answers():
    task = get_task("rg:graph_color")
    p = task.problems("train", 1)[0]
    assert p.answer == "" and task.score("garbage", p) == 0.0
    # the scorer verifies a solution instead: a proper colouring (checked here by us) scores 1
    puzzle = p.meta["entry"]["metadata"]["puzzle"]
    colours = {v: puzzle["color_options"][0] for v in puzzle["vertices"]}
    for a, b in puzzle["edges"]:
        if colours[a] == colours[b]:
            colours[b] = next(c for c in puzzle["color_options"] if all(
                c != colours[u] for e in puzzle["edges"] for u in e if b in e and u != b))
    assert all(colours[a] != colours[b] for a, b in puzzle["edges"])
    assert task.score(json.dumps({str(k): v for k, v in colours.items()}), p) == 1.0
    monochrome = {str(v): 1 for v in puzzle["vertices"]}
    assert task.score(json.dumps(monochrome), p) < 1.0
    from nanor1.corpus import pretrain_documents
    with pytest.raises(NanoR1Error, match="no reference answers"):
        pretrain_documents(task, 10, 0)


@pytest.mark.slow
def test_every_reasoning_gym_task_generates_renders_and_scores():
    from nanor1.templates import Template, render_prompt
    for name, _ in list_tasks():
        if not name.startswith("rg:"):
            continue
        if name == "rg:composite":   # a mixture: it needs its member datasets in the options
            with pytest.raises(NanoR1Error, match="rg:composite"):
                get_task(name)
            continue
        task = get_task(name)
        for p in task.problems("train", 1) + task.problems("eval", 1):
            assert p.question and render_prompt(p.question, Template.R1_ZERO)
            assert task.score(None, p) == 0.0 and 0.0 <= task.score("garbage", p) <= 1.0
            if p.answer:
                assert task.score(p.answer, p) == 1.0, name
