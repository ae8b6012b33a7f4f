"""`nanor1 eval`: R1's evaluation protocol (k samples at T=0.6, top-p 0.95; pass@1, cons@k, pass@k).

`evaluate(cfg)` samples every problem k times through the engine, caches each generation in
generations.jsonl (a rerun skips what is done), scores strict and lenient answers and writes
results.json + results.md with a 95% interval on every accuracy. `compare` sets two results side by side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanor1.common import (NanoR1Error, atomic_write_json, atomic_write_text, chunks, code_version, progress,
                           read_json, read_jsonl, resolve_device)
from nanor1.config import to_dict
from nanor1.engine import SamplingParams
from nanor1.evalmath import cluster_interval, majority_vote, paired_difference, pass_at_k, wilson_interval
from nanor1.policy import Policy, load_policy
from nanor1.tokenizer import encode_prompt
from nanor1.tasks import get_task
from nanor1.templates import Template, extract_answer_lenient, extract_answer_strict, render_prompt, split_reasoning

MODES = ("strict", "lenient")   # strict: the answer counts only inside R1's format; lenient: answer only


@dataclass
class EvalConfig:
    model: str = ""                     # nanor1 checkpoint dir or local Hugging Face model dir
    tasks: list[str] = field(default_factory=lambda: ["chain_sum"])   # built-in, rg:<name> or a data file
    task_options: dict = field(default_factory=dict)   # {spec: {option: value}}, e.g. {"chain_sum": {"terms": 4}}
    difficulties: list[int] = field(default_factory=list)   # evaluate each task at these levels (per-level tables)
    n_problems: int = 50                # per task
    k: int = 4                          # samples per problem (R1 uses 64 for AIME; ignored when greedy)
    temperature: float = 0.6            # R1 paper §3.1 evaluation setup
    top_p: float = 0.95
    greedy: bool = False                # one temperature-0 sample per problem
    max_new_tokens: int = 512
    template: Template = Template.R1_ZERO
    split: str = "eval"
    seed: int = 0
    batch_size: int = 32
    correct_threshold: float = 1.0      # a sample is correct when its task score reaches this
    z: float = 1.96                     # 95% intervals
    device: str = "auto"
    out_dir: str = "runs/eval"          # "" keeps everything in memory (in-process evaluation)

    @property
    def samples(self) -> int:
        return 1 if self.greedy else self.k

    def validate(self) -> None:
        if not self.tasks:
            raise NanoR1Error("eval: no tasks given; set tasks=NAME[,NAME...]")
        if len(set(self.tasks)) != len(self.tasks):
            raise NanoR1Error(f"eval: a task is listed twice in {self.tasks}; list each once")
        stray = sorted(set(self.task_options) - set(self.tasks))
        if stray:
            raise NanoR1Error(f"eval: task_options names {stray}, which are not in tasks {self.tasks}")
        if self.difficulties and any("difficulty" in (o or {}) for o in self.task_options.values()):
            raise NanoR1Error("eval: give difficulty either in difficulties or in task_options, not both")
        for name in ("n_problems", "k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise NanoR1Error(f"eval: {name} must be at least 1, got {getattr(self, name)}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise NanoR1Error("eval: need temperature > 0 and 0 < top_p <= 1 (or greedy=true)")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: the model identity in the cache key."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def sample_seed(seed: int, task: str, problem_id: str, index: int) -> int:
    """Per-sample RNG seed from (seed, task, problem, sample index): results do not depend on batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{task}|{problem_id}|{index}".encode()).digest()[:8], "big") >> 1


def sampling_params(cfg: EvalConfig, seed: int) -> SamplingParams:
    if cfg.greedy:
        return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0, seed=seed)
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)


# ----------------------------------------------------------------------------- generation (cached)

def _generate(cfg: EvalConfig, policy: Policy, requests: list[tuple[str, str, int, list[int], str]],
              cache_path: Path | None, cfg_hash: str) -> dict[tuple[str, str, int], dict]:
    """Generations for (task, problem key, sample index, prompt ids, prompt hash) requests, reusing the cache."""
    done: dict[tuple[str, str, int], dict] = {}
    if cache_path is not None:
        for row in read_jsonl(cache_path):
            if row.get("cfg_hash") == cfg_hash:
                done[(row["task"], row["problem_id"], row["sample"])] = row
    # a cached row counts only if its prompt is unchanged (same task version, template and tokenizer)
    todo = [r for r in requests if done.get(r[:3], {}).get("prompt_sha") != r[4]]
    if not todo:
        return done
    engine = policy.engine(max_batch=cfg.batch_size)
    f = open(cache_path, "a", encoding="utf-8") if cache_path is not None else None
    if f is not None and f.tell() > 0:
        with open(cache_path, "rb") as g:
            g.seek(-1, 2)
            if g.read(1) != b"\n":   # a torn last line from a crash: end it so our first row stays whole
                f.write("\n")
    try:
        bar = progress(total=len(todo), desc="eval", unit="sample")
        for batch in chunks(todo, cfg.batch_size):
            params = [sampling_params(cfg, sample_seed(cfg.seed, t, u, s)) for t, u, s, _, _ in batch]
            comps = engine.generate([r[3] for r in batch], params)
            for (t, u, s, _, psha), c in zip(batch, comps):
                row = {"cfg_hash": cfg_hash, "task": t, "problem_id": u, "sample": s,
                       "prompt_sha": psha, "text": c.text, "n_tokens": len(c.ids),
                       "finish_reason": c.finish_reason}
                done[(t, u, s)] = row
                if f is not None:
                    f.write(json.dumps(row) + "\n")
            if f is not None:   # flushed per batch: an interrupted run loses at most the batch in flight
                f.flush()
            bar.update(len(batch))
        bar.close()
    finally:
        if f is not None:
            f.close()
    return done


# ----------------------------------------------------------------------------- scoring

def _norm(answer: str) -> str:
    return " ".join(answer.split())


def score_problem(task, problem, texts: list[str], n_tokens: list[int], finish: list[str], tokenizer,
                  threshold: float, difficulty=None) -> dict:
    """Per-problem record: per-sample correctness, majority-vote correctness, format and lengths."""
    rec: dict = {"difficulty": difficulty, "n_tokens": n_tokens,
                 "truncated": [r == "length" for r in finish], "format": [], "reasoning_tokens": []}
    answers = {"strict": [extract_answer_strict(t) for t in texts],
               "lenient": [extract_answer_lenient(t) for t in texts]}
    for mode in MODES:
        rec[mode] = [task.score(a, problem) >= threshold for a in answers[mode]]
        voted = majority_vote(answers[mode], key=_norm)
        rec[f"cons_{mode}"] = voted is not None and task.score(voted, problem) >= threshold
        rec[f"voted_{mode}"] = voted
    rec["format"] = [a is not None for a in answers["strict"]]
    for t in texts:
        reasoning, _ = split_reasoning(t)
        rec["reasoning_tokens"].append(len(tokenizer.encode(reasoning)) if reasoning else 0)
    return rec


def pass_ks(k: int) -> list[int]:
    """pass@j reported for j = 1, 2, 4, ... up to k, and k itself."""
    js, j = [], 1
    while j < k:
        js.append(j)
        j *= 2
    return js + [k]


def summarize(records: list[dict], k: int, z: float) -> dict:
    """Metrics over a group of problem records, each accuracy an {value, lo, hi} with its interval."""
    m = len(records)
    out: dict = {"n_problems": m, "n_samples": m * k}
    for mode in MODES:
        res = {"pass@1": cluster_interval([sum(r[mode]) / k for r in records], k, z).as_dict()}
        if k > 1:
            res[f"cons@{k}"] = wilson_interval(sum(r[f"cons_{mode}"] for r in records), m, z).as_dict()
            for j in pass_ks(k)[1:]:
                # per-problem unbiased pass@j; each value is one problem's estimate, so clusters of 1
                res[f"pass@{j}"] = cluster_interval([pass_at_k(k, sum(r[mode]), j) for r in records], 1, z).as_dict()
        out[mode] = res
    out["format_rate"] = cluster_interval([sum(r["format"]) / k for r in records], k, z).as_dict()
    out["truncated_rate"] = sum(sum(r["truncated"]) for r in records) / (m * k)
    out["response_len"] = sum(sum(r["n_tokens"]) for r in records) / (m * k)
    out["reasoning_len"] = sum(sum(r["reasoning_tokens"]) for r in records) / (m * k)
    # lenient accuracy of the samples that reason and of those that answer directly: RL can only reinforce
    # reasoning that is already right some of the time (R1 section 2.2.4)
    for name, reasons in (("reasoned", True), ("direct", False)):
        hits = [ok for r in records for ok, t in zip(r["lenient"], r["reasoning_tokens"]) if (t > 0) == reasons]
        out[name] = {"samples": len(hits), "lenient_accuracy": sum(hits) / len(hits) if hits else None}
    return out


def per_problem_metrics(rec: dict, k: int) -> dict:
    """The per-problem values whose means are the reported accuracies (what `compare` pairs up)."""
    out = {}
    for mode in MODES:
        c = sum(rec[mode])
        vals = {"pass@1": c / k}
        if k > 1:
            vals[f"cons@{k}"] = float(rec[f"cons_{mode}"])
            vals.update({f"pass@{j}": pass_at_k(k, c, j) for j in pass_ks(k)[1:]})
        out[mode] = vals
    out["difficulty"], out["voted"] = rec["difficulty"], rec["voted_lenient"]
    return out


# ----------------------------------------------------------------------------- the stage

def evaluate(cfg: EvalConfig, model=None, tokenizer=None, *, policy: Policy | None = None) -> dict:
    """Run the evaluation of `cfg.model`, or in-process (GRPO, speedrun) of a nanor1 `model` + `tokenizer`
    or of any loaded `policy`, without reloading."""
    cfg.validate()
    if policy is None and model is not None:
        if tokenizer is None:
            raise NanoR1Error("eval: a model passed in-process needs its tokenizer too")
        policy = Policy(model, tokenizer, "nanor1", Path(cfg.model or "in-process"))
    if policy is None:
        if not cfg.model:
            raise NanoR1Error("eval: no model given; set model=PATH (a nanor1 checkpoint or a local HF model dir)")
        policy = load_policy(cfg.model, device=resolve_device(cfg.device))
    tokenizer = policy.tokenizer
    k = cfg.samples
    fingerprint = model_fingerprint(policy.model)
    sampling = {"template": cfg.template.value, "greedy": cfg.greedy, "temperature": cfg.temperature,
                "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    cfg_hash = _sha({"model": fingerprint, **sampling})[:16]
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    units, requests = [], []   # units: (task spec, problem key, task, problem, difficulty)
    for spec in cfg.tasks:
        for level in cfg.difficulties or [None]:
            opts = {**(cfg.task_options.get(spec) or {}), **({} if level is None else {"difficulty": level})}
            task = get_task(spec, **opts)
            probs = task.problems(cfg.split, cfg.n_problems, cfg.seed)
            if len({p.id for p in probs}) != len(probs):
                raise NanoR1Error(f"eval: task {spec!r} returned duplicate problem ids; its generator needs fixing")
            units += [(spec, str(p.id) if level is None else f"{level}/{p.id}", task, p,
                       level if level is not None else (p.meta or {}).get("difficulty")) for p in probs]
    for spec, key, _, p, _ in units:
        ids = encode_prompt(tokenizer, render_prompt(p.question, cfg.template, tokenizer))
        requests += [(spec, key, s, ids, _sha(ids)[:16]) for s in range(k)]
    t0 = time.time()
    gens = _generate(cfg, policy, requests, out / "generations.jsonl" if out else None, cfg_hash)

    results: dict = {"model": {"name": Path(cfg.model).name if cfg.model else "in-process model",
                               "path": cfg.model, "kind": policy.kind, "fingerprint": fingerprint},
                     "k": k, "sampling": sampling, "config": to_dict(cfg), "code_version": code_version(),
                     "seconds": round(time.time() - t0, 2), "tasks": {}, "problems": {}}
    records: dict[str, list[dict]] = {spec: [] for spec in cfg.tasks}
    for spec, key, task, p, level in units:
        rows = [gens[(spec, key, s)] for s in range(k)]
        rec = score_problem(task, p, [r["text"] for r in rows], [r["n_tokens"] for r in rows],
                            [r["finish_reason"] for r in rows], tokenizer, cfg.correct_threshold, level)
        records[spec].append(rec)
        results["problems"].setdefault(spec, {})[key] = per_problem_metrics(rec, k)
    for spec, recs in records.items():
        by_diff = defaultdict(list)
        for rec in recs:
            if rec["difficulty"] is not None:
                by_diff[str(rec["difficulty"])].append(rec)
        results["tasks"][spec] = {"metrics": summarize(recs, k, cfg.z),
                                  "by_difficulty": {d: summarize(rs, k, cfg.z) for d, rs in sorted(by_diff.items())}}
    all_records = [rec for recs in records.values() for rec in recs]
    if len(cfg.tasks) > 1:
        results["overall"] = summarize(all_records, k, cfg.z)
    if out is not None:
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", f"# Evaluation: {results['model']['name']}\n\n"
                          + format_results_markdown(results))
    return results


# ----------------------------------------------------------------------------- tables

def _fmt(e: dict | None) -> str:
    return "–" if e is None else f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _split(part: dict | None) -> str:
    """Lenient accuracy of one side of the reasoning split, with its sample count (older results lack it)."""
    if not part or not part["samples"]:
        return "–"
    return f"{part['lenient_accuracy']:.3f} of {part['samples']}"


def format_results_markdown(results: dict) -> str:
    """Markdown tables: accuracy per task and mode, format and lengths, then per difficulty."""
    k, s = results["k"], results["sampling"]
    proto = ("greedy decoding, 1 sample per problem" if s["greedy"] else
             f"{k} samples per problem at temperature {s['temperature']}, top-p {s['top_p']}")
    lines = [f"Model `{results['model']['name']}` ({results['model']['fingerprint']}), template `{s['template']}`, "
             f"{proto}, max {s['max_new_tokens']} new tokens, seed {s['seed']}. Brackets are 95% intervals "
             "(problems as clusters); strict needs R1's `<think>`/`<answer>` format, lenient takes the answer alone.",
             "", "### Accuracy", ""]
    metrics = ["pass@1"] + ([f"cons@{k}", f"pass@{k}"] if k > 1 else [])
    rows = list(results["tasks"].items()) + ([("all tasks", {"metrics": results["overall"]})]
                                             if "overall" in results else [])
    lines += ["| task | mode | problems | " + " | ".join(metrics) + " |", "|---|---|---:|" + "---:|" * len(metrics)]
    for name, t in rows:
        for mode in MODES:
            m = t["metrics"]
            lines.append(f"| {name} | {mode} | {m['n_problems']} | "
                         + " | ".join(_fmt(m[mode].get(x)) for x in metrics) + " |")
    lines += ["", "### Format and length", "",
              "| task | format rate | truncated | response tokens | reasoning tokens | right when reasoning "
              "| right otherwise |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in rows:
        m = t["metrics"]
        lines.append(f"| {name} | {_fmt(m['format_rate'])} | {m['truncated_rate']:.3f} | {m['response_len']:.1f} | "
                     f"{m['reasoning_len']:.1f} | {_split(m.get('reasoned'))} | {_split(m.get('direct'))} |")
    diff_rows = [(name, d, m) for name, t in results["tasks"].items() for d, m in t.get("by_difficulty", {}).items()]
    if diff_rows:
        lines += ["", "### Per difficulty (lenient unless marked)", "",
                  "| task | difficulty | problems | pass@1 strict | " + " | ".join(metrics) + " | format rate |",
                  "|---|---|---:|---:|" + "---:|" * len(metrics) + "---:|"]
        for name, d, m in diff_rows:
            lines.append(f"| {name} | {d} | {m['n_problems']} | {_fmt(m['strict']['pass@1'])} | "
                         + " | ".join(_fmt(m["lenient"].get(x)) for x in metrics) + f" | {_fmt(m['format_rate'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- comparing two models

def compare(results_a: dict, results_b: dict, z: float = 1.96) -> dict:
    """Paired differences (A - B) on the problems both evaluations share, per task, mode and metric."""
    out = {"a": results_a["model"], "b": results_b["model"], "tasks": {}}
    for task in results_a.get("problems", {}):
        pa, pb = results_a["problems"][task], results_b.get("problems", {}).get(task)
        if not pb:
            continue
        ids = sorted(set(pa) & set(pb))
        if not ids:
            continue
        res: dict = {"n_problems": len(ids)}
        for mode in MODES:
            res[mode] = {}
            for metric in pa[ids[0]][mode]:
                if metric not in pb[ids[0]][mode]:
                    continue
                a = [pa[i][mode][metric] for i in ids]
                b = [pb[i][mode][metric] for i in ids]
                res[mode][metric] = {"a": sum(a) / len(a), "b": sum(b) / len(b),
                                     "diff": paired_difference(a, b, z).as_dict()}
        out["tasks"][task] = res
    if not out["tasks"]:
        raise NanoR1Error("eval --compare: the two evaluations share no task and problem ids; "
                          "run both with the same tasks, n_problems and seed")
    return out


def format_compare_markdown(cmp: dict) -> str:
    a, b = cmp["a"]["name"], cmp["b"]["name"]
    lines = [f"A = `{a}` ({cmp['a']['fingerprint']}), B = `{b}` ({cmp['b']['fingerprint']}). "
             "Differences are paired over the same problems, with 95% intervals.", "",
             "| task | mode | metric | problems | A | B | A - B |", "|---|---|---|---:|---:|---:|---:|"]
    for task, res in cmp["tasks"].items():
        for mode in MODES:
            for metric, v in res[mode].items():
                d = v["diff"]
                lines.append(f"| {task} | {mode} | {metric} | {res['n_problems']} | {v['a']:.3f} | {v['b']:.3f} | "
                             f"{d['value']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    return "\n".join(lines) + "\n"


def _resolve(cfg: EvalConfig, x: str, slot: str) -> dict:
    """A previous evaluation (results.json or its folder) is read; anything else is a model to evaluate."""
    p = Path(x)
    if p.is_file() and p.name == "results.json":
        return read_json(p)
    if (p / "results.json").is_file():
        return read_json(p / "results.json")
    sub = str(Path(cfg.out_dir or "runs/eval") / f"{slot}_{p.name}")
    return evaluate(dataclasses.replace(cfg, model=x, out_dir=sub))


def run_compare(cfg: EvalConfig, a: str, b: str) -> dict:
    """`nanor1 eval --compare A B`: evaluate (or read) both, write compare.json and compare.md in out_dir."""
    cmp = compare(_resolve(cfg, a, "a"), _resolve(cfg, b, "b"), cfg.z)
    if cfg.out_dir:
        atomic_write_json(Path(cfg.out_dir) / "compare.json", cmp)
        atomic_write_text(Path(cfg.out_dir) / "compare.md", "# Comparison\n\n" + format_compare_markdown(cmp))
    return cmp
