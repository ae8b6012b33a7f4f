"""The eval stage: metrics from hand-made records, paired comparison, and end-to-end runs on a tiny model."""

import dataclasses
import json
import math

import pytest

import nanor1.evaluate as ev
from nanor1.common import NanoR1Error, read_jsonl
from nanor1.config import load_config
from nanor1.engine import Completion, Engine
from nanor1.evaluate import (EvalConfig, compare, format_compare_markdown, format_results_markdown,
                             per_problem_metrics, pass_ks, run_compare, sample_seed, summarize)
from nanor1.policy import Policy
from nanor1.tasks import get_task
from nanor1.templates import R1_ZERO_PROMPT, Template, extract_answer_lenient, extract_answer_strict


def _rec(strict, lenient, fmt, n_tokens, truncated, cons_lenient, cons_strict=False, difficulty=None):
    return {"difficulty": difficulty, "strict": strict, "lenient": lenient, "format": fmt, "n_tokens": n_tokens,
            "truncated": truncated, "reasoning_tokens": [t // 2 for t in n_tokens], "cons_strict": cons_strict,
            "cons_lenient": cons_lenient, "voted_strict": None, "voted_lenient": "5"}


T, F = True, False
RECORDS = [
    _rec([T, F, F, F], [T, T, F, T], [T, F, F, F], [10, 20, 30, 40], [F, F, F, T], cons_lenient=True),
    _rec([F, F, F, F], [F, F, T, F], [T, T, F, F], [5, 5, 5, 5], [F, F, F, F], cons_lenient=False),
]


def test_summarize_splits_lenient_accuracy_by_reasoning():
    recs = [dict(RECORDS[0], reasoning_tokens=[5, 0, 0, 7]), dict(RECORDS[1], reasoning_tokens=[0, 0, 3, 0])]
    m = summarize(recs, k=4, z=1.96)
    # reasoning samples: A0 right, A3 right, B2 right; direct: A1 right, A2 wrong, B0, B1, B3 wrong
    assert m["reasoned"] == {"samples": 3, "lenient_accuracy": 1.0}
    assert m["direct"] == {"samples": 5, "lenient_accuracy": pytest.approx(0.2)}
    assert summarize(RECORDS, k=4, z=1.96)["direct"] == {"samples": 0, "lenient_accuracy": None}


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


def test_run_compare_reads_result_folders(tmp_path):
    for name, vals in (("a", {"p1": 1.0, "p2": 0.0}), ("b", {"p1": 0.0, "p2": 0.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(name, vals)))
    cfg = EvalConfig(out_dir=str(tmp_path / "cmp"))
    cmp = run_compare(cfg, str(tmp_path / "a"), str(tmp_path / "b" / "results.json"))
    assert cmp["tasks"]["t"]["strict"]["pass@1"]["diff"]["value"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == json.loads(json.dumps(cmp))
    assert "| t | strict | pass@1 | 2 | 0.500 | 0.000 | +0.500 [" in (tmp_path / "cmp" / "compare.md").read_text()


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


# ----------------------------------------------------------------------------- end to end, tiny model

@pytest.fixture(scope="module")
def tiny():
    from nanor1.model.config import ModelConfig
    from nanor1.model.transformer import Transformer
    from nanor1.tokenizer import train_tokenizer
    texts = [R1_ZERO_PROMPT, "Calculate 3 + 4. <think> 3 plus 4 </think> <answer> 7 </answer>"] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, n_mtp_layers=0))
    return model.init_weights(0).eval(), tok


def _cfg(tmp_path, **kw):
    base = dict(tasks=["chain_sum", "rg:basic_arithmetic"], n_problems=3, k=3, max_new_tokens=6,
                template=Template.CHAT, batch_size=4, out_dir=str(tmp_path / "eval"))
    return EvalConfig(**{**base, **kw})


def test_evaluate_tiny_model_metrics_match_a_recount(tiny, tmp_path):
    """Real engine on a random tiny model: every number in results.json recounted from generations.jsonl."""
    pytest.importorskip("reasoning_gym")  # a dependency; only a bare GPU image (bench/gpu_check.sh) lacks it
    model, tok = tiny
    cfg = _cfg(tmp_path)
    res = ev.evaluate(cfg, model, tok)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 3 and {r["task"] for r in rows} == {"chain_sum", "rg:basic_arithmetic"}
    assert all(r["n_tokens"] <= 6 for r in rows)
    for spec in cfg.tasks:
        task = get_task(spec)
        probs = {p.id: p for p in task.problems("eval", 3, 0)}
        mine = [r for r in rows if r["task"] == spec]
        strict = [task.score(extract_answer_strict(r["text"]), probs[r["problem_id"]]) >= 1 for r in mine]
        lenient = [task.score(extract_answer_lenient(r["text"]), probs[r["problem_id"]]) >= 1 for r in mine]
        m = res["tasks"][spec]["metrics"]
        assert m["strict"]["pass@1"]["value"] == pytest.approx(sum(strict) / 9)    # equal problem sizes: plain mean
        assert m["lenient"]["pass@1"]["value"] == pytest.approx(sum(lenient) / 9)
        assert m["format_rate"]["value"] == pytest.approx(sum(extract_answer_strict(r["text"]) is not None
                                                              for r in mine) / 9)
        assert m["response_len"] == pytest.approx(sum(r["n_tokens"] for r in mine) / 9)
        assert m["truncated_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in mine) / 9)
        assert set(res["problems"][spec]) == set(probs)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["tasks"] == json.loads(json.dumps(res["tasks"])) and "overall" in saved
    assert "| chain_sum | lenient | 3 |" in (tmp_path / "eval" / "results.md").read_text()


def test_evaluate_resumes_from_cache_and_is_batch_invariant(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = _cfg(tmp_path, tasks=["chain_sum"], k=2, max_new_tokens=4)
    first = ev.evaluate(dataclasses.replace(cfg, batch_size=7), model, tok)
    cache = tmp_path / "eval" / "generations.jsonl"
    lines = cache.read_text().splitlines()
    # interrupted run: drop the last samples, then rerun; only the missing ones are generated
    cache.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])   # and a torn last line
    calls = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate",
                        lambda self, p, s, **kw: calls.append(len(p)) or real(self, p, s, **kw))
    again = ev.evaluate(dataclasses.replace(cfg, batch_size=2), model, tok)
    assert sum(calls) == 3 and again["tasks"] == first["tasks"]
    # a fully cached rerun generates nothing
    calls.clear()
    ev.evaluate(cfg, model, tok)
    assert calls == []
    # per-sample seeds: a fresh run with batch size 1 gives the same texts as batch size 7
    ev.evaluate(dataclasses.replace(cfg, batch_size=1, out_dir=str(tmp_path / "b1")), model, tok)
    def texts(path):
        return sorted((r["task"], r["problem_id"], r["sample"], r["text"]) for r in read_jsonl(path))
    assert len(texts(cache)) == 6 and texts(tmp_path / "b1" / "generations.jsonl") == texts(cache)
    # a different sampling config is a different cache key: everything is generated again
    calls.clear()
    ev.evaluate(dataclasses.replace(cfg, max_new_tokens=3), model, tok)
    assert sum(calls) == 6


class _ScriptedEngine:
    """Answers by sample index: 0 right in format, 1 right without format, 2 wrong in format."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompts, params):
        out = []
        for ids, sp in zip(prompts, params):
            text = self.tok.decode(ids)
            q = text.split("<|user|>")[1].split("<|assistant|>")[0]
            right = str(sum(int(x) for x in q.split("+")))
            i = _ScriptedEngine.index[sp.seed]
            comp = [f"<think> adding </think> <answer>{right}</answer>", f"so it is {right}",
                    "<think> hmm </think> <answer> 0 </answer>"][i]
            out.append(Completion(ids, [1] * (i + 2), comp, "stop", []))
        return out


def test_evaluate_scoring_hand_values(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    cfg = _cfg(tmp_path, tasks=["chain_sum"], difficulties=[0, 1])
    probs = [(f"{d}/{p.id}") for d in (0, 1) for p in get_task("chain_sum", difficulty=d).problems("eval", 3, 0)]
    _ScriptedEngine.index = {ev.sample_seed(0, "chain_sum", key, s): s for key in probs for s in range(3)}
    monkeypatch.setattr(Policy, "engine", lambda self, **kw: _ScriptedEngine(self.tokenizer))
    res = ev.evaluate(cfg, model, tok)
    m = res["tasks"]["chain_sum"]["metrics"]
    assert m["n_problems"] == 6 and set(res["tasks"]["chain_sum"]["by_difficulty"]) == {"0", "1"}
    # strict: 1 of 3 right per problem; lenient: 2 of 3; votes: strict tie (right, "0") -> first seen wins
    assert m["strict"]["pass@1"]["value"] == pytest.approx(1 / 3)
    assert m["lenient"]["pass@1"]["value"] == pytest.approx(2 / 3)
    assert m["lenient"]["cons@3"]["value"] == 1.0 and m["strict"]["cons@3"]["value"] == 1.0
    assert m["lenient"]["pass@2"]["value"] == pytest.approx(1.0)                # c=2 of 3: any pair has one
    assert m["strict"]["pass@2"]["value"] == pytest.approx(1 - 1 / 3)           # 1 - C(2,2)/C(3,2)
    assert m["format_rate"]["value"] == pytest.approx(2 / 3)
    assert m["response_len"] == pytest.approx(3.0)                             # (2 + 3 + 4) / 3
    # identical problems: the interval collapses to Wilson over all 18 samples (design effect 1)
    from nanor1.evalmath import wilson_interval
    assert (m["strict"]["pass@1"]["lo"], m["strict"]["pass@1"]["hi"]) == pytest.approx(wilson_interval(6, 18)[1:])


def test_greedy_evaluates_one_sample(tiny, tmp_path):
    model, tok = tiny
    res = ev.evaluate(_cfg(tmp_path, tasks=["chain_sum"], greedy=True, k=8, out_dir=""), model, tok)
    assert res["k"] == 1 and list(res["tasks"]["chain_sum"]["metrics"]["lenient"]) == ["pass@1"]
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpoint_and_exported_hf_model_agree(tiny, tmp_path, seed):
    """Same weights three ways: a nanor1 checkpoint, its DeepSeek-V3 HF export loaded by `load_policy`, and
    the export run by transformers' own DeepseekV3ForCausalLM through the HF backend: same samples, same numbers."""
    pytest.importorskip("reasoning_gym")  # a dependency; only a bare GPU image (bench/gpu_check.sh) lacks it
    import warnings
    from safetensors.torch import save_file
    from nanor1.checkpoint import save_checkpoint
    from nanor1.hf_backend import load_hf_causal_lm
    from nanor1.model.hf import to_hf_config, to_hf_state_dict
    model, tok = tiny
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tokenizer=tok)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(to_hf_config(model.cfg, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                                            pad_id=tok.pad_id)))
    save_file(to_hf_state_dict(model), str(hf / "model.safetensors"))
    tok.save(hf)
    # top_p=1: this random model's next-token distribution is nearly flat, so which tokens make the top 95% turns
    # on differences in the last bits between the two decode paths (MLA's absorbed cache, transformers' expanded
    # one), and one token kept or dropped shifts every later one in the CDF. Without the filter only a draw
    # within ~1e-7 of a CDF step could differ.
    cfg = _cfg(tmp_path, n_problems=1, k=2, max_new_tokens=5, device="cpu", top_p=1.0, seed=seed)
    runs = {"ckpt": ev.evaluate(dataclasses.replace(cfg, model=str(ckpt), out_dir=str(tmp_path / "r_ckpt"))),
            "hf": ev.evaluate(dataclasses.replace(cfg, model=str(hf), out_dir=str(tmp_path / "r_hf")))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model, hf_tok = load_hf_causal_lm(hf)
    assert type(hf_model).__name__ == "DeepseekV3ForCausalLM"
    tf_cfg = dataclasses.replace(cfg, model=str(hf), out_dir=str(tmp_path / "r_transformers"))
    runs["transformers"] = ev.evaluate(tf_cfg, policy=Policy(hf_model, hf_tok, "hf", hf))
    assert runs["transformers"]["model"]["kind"] == "hf" and runs["ckpt"]["model"]["kind"] == "nanor1"

    def texts(name):
        return sorted((r["task"], r["problem_id"], r["sample"], r["text"])
                      for r in read_jsonl(tmp_path / f"r_{name}" / "generations.jsonl"))
    assert len(texts("ckpt")) == 4 and any(t[3].strip() for t in texts("ckpt"))
    assert texts("hf") == texts("ckpt") and texts("transformers") == texts("ckpt")
    for name in ("hf", "transformers"):
        assert runs[name]["tasks"] == runs["ckpt"]["tasks"]
        cmp = compare(runs["ckpt"], runs[name])
        assert all(v["diff"]["value"] == 0.0 for t in cmp["tasks"].values() for mode in ("strict", "lenient")
                   for v in t[mode].values())
