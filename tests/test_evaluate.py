"""The eval stage: metrics from hand-made records, paired comparison, and end-to-end runs on a tiny model."""

import math

import pytest

from nanor1.common import NanoR1Error
from nanor1.config import load_config
from nanor1.evaluate import (EvalConfig, compare, format_compare_markdown, format_results_markdown,
                             per_problem_metrics, pass_ks, sample_seed, summarize)
from nanor1.templates import Template


def _rec(strict, lenient, fmt, n_tokens, truncated, cons_lenient, cons_strict=False, difficulty=None):
    return {"difficulty": difficulty, "strict": strict, "lenient": lenient, "format": fmt, "n_tokens": n_tokens,
            "truncated": truncated, "reasoning_tokens": [t // 2 for t in n_tokens], "cons_strict": cons_strict,
            "cons_lenient": cons_lenient, "voted_strict": None, "voted_lenient": "5"}


T, F = True, False
RECORDS = [
    _rec([T, F, F, F], [T, T, F, T], [T, F, F, F], [10, 20, 30, 40], [F, F, F, T], cons_lenient=True),
    _rec([F, F, F, F], [F, F, T, F], [T, T, F, F], [5, 5, 5, 5], [F, F, F, F], cons_lenient=False),
]


def test_summarize_hand_values():
    m = summarize(RECORDS, k=4, z=1.96)
    assert m["n_problems"] == 2 and m["n_samples"] == 8
    assert m["strict"]["pass@1"]["value"] == pytest.approx((1 / 4 + 0) / 2)
    assert m["lenient"]["pass@1"]["value"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    # pass@2 lenient: problem A (c=3 of 4) -> 1; problem B (c=1) -> 1 - C(3,2)/C(4,2) = 1/2
    assert m["lenient"]["pass@2"]["value"] == pytest.approx(0.75)
    assert m["strict"]["pass@2"]["value"] == pytest.approx((0.5 + 0) / 2)
    assert m["lenient"]["pass@4"]["value"] == 1.0 and m["strict"]["pass@4"]["value"] == 0.5
    assert m["lenient"]["cons@4"]["value"] == 0.5 and m["strict"]["cons@4"]["value"] == 0.0
    # cons@k is binary per problem: Wilson over problems, here 1 of 2
    z2 = 1.96 ** 2
    half = 1.96 / (1 + z2 / 2) * math.sqrt(0.25 / 2 + z2 / 16)
    assert m["lenient"]["cons@4"]["lo"] == pytest.approx(0.5 - half)
    assert m["format_rate"]["value"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert m["truncated_rate"] == pytest.approx(1 / 8)
    assert m["response_len"] == pytest.approx(120 / 8) and m["reasoning_len"] == pytest.approx(58 / 8)
    for mode in ("strict", "lenient"):
        for e in m[mode].values():
            assert 0 <= e["lo"] <= e["value"] <= e["hi"] <= 1


def test_pass_ks_and_per_problem_metrics():
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]
    pp = per_problem_metrics(RECORDS[1], 4)
    assert pp["lenient"] == pytest.approx({"pass@1": 0.25, "cons@4": 0.0, "pass@2": 0.5, "pass@4": 1.0})
    assert per_problem_metrics(_rec([T], [T], [T], [3], [F], True), 1)["strict"] == {"pass@1": 1.0}


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "chain_sum", "p1", 0) == sample_seed(0, "chain_sum", "p1", 0)
    seeds = {sample_seed(s, t, p, i) for s in (0, 1) for t in ("a", "b") for p in ("p1", "p2") for i in range(4)}
    assert len(seeds) == 32 and all(0 <= x < 2 ** 63 for x in seeds)


def test_config_from_yaml_and_validation(tmp_path):
    y = tmp_path / "eval.yaml"
    y.write_text("tasks: [chain_sum, rg:leg_counting]\nk: 8\ntask_options: {chain_sum: {terms: 3}}\n")
    cfg = load_config(EvalConfig, y, ["template=chat", "temperature=0.7"])
    assert cfg.tasks == ["chain_sum", "rg:leg_counting"] and cfg.k == 8 and cfg.template is Template.CHAT
    assert cfg.task_options == {"chain_sum": {"terms": 3}} and cfg.samples == 8
    assert load_config(EvalConfig, None, ["greedy=true"]).samples == 1
    for bad, msg in [(["tasks=[]"], "no tasks"), (["k=0"], "k must be"), (["top_p=0"], "top_p"),
                     (["tasks=[a,a]"], "twice"), (["task_options={b: {x: 1}}"], "not in tasks"),
                     (["template=xml"], "template")]:
        with pytest.raises(NanoR1Error, match=msg):
            load_config(EvalConfig, None, bad)


def _results(name, per_problem):
    return {"model": {"name": name, "fingerprint": name * 2}, "k": 2,
            "problems": {"t": {pid: {"strict": {"pass@1": v}, "lenient": {"pass@1": v, "cons@2": float(v == 1)}}
                               for pid, v in per_problem.items()}}}


def test_compare_pairs_shared_problems():
    a = _results("a", {"p1": 1.0, "p2": 0.5, "p3": 0.0, "only_a": 1.0})
    b = _results("b", {"p1": 0.5, "p2": 0.5, "p3": 0.0, "only_b": 0.0})
    b["problems"]["extra_task"] = {"q": {"strict": {"pass@1": 1.0}, "lenient": {"pass@1": 1.0}}}
    cmp = compare(a, b)
    assert list(cmp["tasks"]) == ["t"] and cmp["tasks"]["t"]["n_problems"] == 3
    v = cmp["tasks"]["t"]["lenient"]["pass@1"]
    # d = [.5, 0, 0]: mean 1/6, sd^2 = 1/12, SE = sqrt(1/36) = 1/6
    assert v["a"] == pytest.approx(0.5) and v["b"] == pytest.approx(1 / 3)
    assert (v["diff"]["value"], v["diff"]["lo"], v["diff"]["hi"]) == pytest.approx(
        (1 / 6, 1 / 6 - 1.96 / 6, 1 / 6 + 1.96 / 6))
    assert cmp["tasks"]["t"]["lenient"]["cons@2"]["diff"]["value"] == pytest.approx(1 / 3)
    md = format_compare_markdown(cmp)
    assert "| t | lenient | pass@1 | 3 | 0.500 | 0.333 | +0.167 [-0.160, +0.493] |" in md
    with pytest.raises(NanoR1Error, match="share no"):
        compare(a, _results("c", {"zzz": 1.0}))


def test_format_results_markdown_lists_every_accuracy_with_interval():
    m = summarize(RECORDS, 4, 1.96)
    res = {"model": {"name": "tiny", "fingerprint": "ab"}, "k": 4,
           "sampling": {"template": "r1-zero", "greedy": False, "temperature": 0.6, "top_p": 0.95,
                        "max_new_tokens": 32, "seed": 0},
           "tasks": {"chain_sum": {"metrics": m, "by_difficulty": {"1": summarize(RECORDS[:1], 4, 1.96)}}}}
    md = format_results_markdown(res)
    assert "| task | mode | problems | pass@1 | cons@4 | pass@4 |" in md
    e = m["lenient"]["pass@1"]
    assert f"| chain_sum | lenient | 2 | 0.500 [{e['lo']:.3f}, {e['hi']:.3f}] | 0.500 [" in md
    assert "| chain_sum | 1 | 1 |" in md and "temperature 0.6, top-p 0.95" in md
