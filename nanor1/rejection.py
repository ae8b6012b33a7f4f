"""Rejection sampling (DeepSeek-R1 section 2.3.3): sample k completions per problem, keep the correct,
well-formed, readable ones, deduplicate, and write them as SFT data with provenance.

    nanor1 rejection-sample model=runs/r1-rl/final out=runs/rs/data.jsonl n_problems=500 k=4
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanor1.checkpoint import manifest_hash
from nanor1.common import NanoR1Error, atomic_write_text, progress
from nanor1.engine import SamplingParams
from nanor1.rewards import Script, accuracy_reward, format_reward, language_consistency_reward
from nanor1.templates import Template, parse_well_formed, render_prompt


class NothingKept(NanoR1Error):
    """Rejection sampling found no sample to keep (callers such as the speedrun name their own settings)."""


@dataclass
class RejectionConfig:
    model: str = ""
    out: str = "runs/rs/data.jsonl"
    task: str = "chain_sum"
    task_options: dict = field(default_factory=dict)
    template: Template = Template.CHAT
    n_problems: int = 500
    k: int = 4  # samples per problem
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    min_language: float = 0.95  # readability: share of the reasoning in the target script
    max_repeat: float = 0.5  # readability: reject reasoning whose most repeated line/step is > this share
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise NanoR1Error("no model given: set model=<checkpoint folder>")
        if self.n_problems < 1 or self.k < 1:
            raise NanoR1Error("n_problems and k must be >= 1")


def repeated_share(reasoning: str) -> float:
    """The share of the reasoning's steps (split on commas, newlines, periods) taken by its most common step;
    long loops of the same step are the unreadable output R1 filters out."""
    steps = [s.strip() for s in re.split(r"[,\n.;]", reasoning) if s.strip()]
    if len(steps) < 4:
        return 0.0
    return max(steps.count(s) for s in set(steps)) / len(steps)


def keep_completion(text: str, problem, task, cfg: RejectionConfig) -> str | None:
    """The rejection rule: correct (strict), well-formed, one script, no looping; returns the reason to drop."""
    if format_reward(text) < 1:
        return "format"
    if accuracy_reward(text, problem, task) < 1:
        return "wrong"
    parsed = parse_well_formed(text)
    reasoning = parsed[0] if parsed else text
    if language_consistency_reward(reasoning, Script.LATIN) < cfg.min_language:
        return "language"
    if repeated_share(reasoning) > cfg.max_repeat:
        return "repetition"
    return None


def rejection_sample(cfg: RejectionConfig, policy=None) -> Path:
    """Write the kept completions as {"messages": [...], "provenance": {...}} lines; returns the file."""
    from nanor1.policy import load_policy
    from nanor1.tasks import get_task
    from nanor1.tokenizer import encode_prompt
    cfg.validate()
    policy = policy or load_policy(cfg.model)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems("train", cfg.n_problems, seed=cfg.seed + 7919)
    if not problems:
        raise NanoR1Error(f"task {cfg.task!r} has no training problems")
    tok = policy.tokenizer
    prompts = [encode_prompt(tok, render_prompt(p.question, cfg.template, tok)) for p in problems]
    engine = policy.engine(max_batch=cfg.batch_size, seed=cfg.seed)
    src = manifest_hash(cfg.model) if cfg.model and (Path(cfg.model) / "manifest.json").is_file() else None
    kept, seen, reasons = [], set(), {"format": 0, "wrong": 0, "language": 0, "repetition": 0, "duplicate": 0}
    jobs = [(i, s) for i in range(len(problems)) for s in range(cfg.k)]
    bar = progress(total=len(jobs), desc="rejection-sample", unit="sample")
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                 seed=cfg.seed * 1_000_003 + i * 97 + s) for i, s in batch]
        for (i, s), c in zip(batch, engine.generate([prompts[i] for i, _ in batch], params)):
            p = problems[i]
            why = keep_completion(c.text, p, task, cfg)
            key = (p.id, " ".join(c.text.split()))
            if why is None and key in seen:
                why = "duplicate"
            if why is not None:
                reasons[why] += 1
                continue
            seen.add(key)
            kept.append({"messages": [{"role": "user", "content": p.question},
                                      {"role": "assistant", "content": c.text.strip()}],
                         "provenance": {"task": cfg.task, "problem_id": p.id, "sample": s, "source_model": cfg.model,
                                        "source_manifest_sha256": src, "temperature": cfg.temperature,
                                        "seed": params[batch.index((i, s))].seed}})
        bar.update(len(batch))
    bar.close()
    out = Path(cfg.out)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in kept))
    stats = {"problems": len(problems), "samples": len(jobs), "kept": len(kept),
             "problems_covered": len({r["provenance"]["problem_id"] for r in kept}), "rejected": reasons,
             "data_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
    atomic_write_text(out.with_suffix(".stats.json"), json.dumps(stats, indent=2) + "\n")
    if not kept:
        raise NothingKept(f"rejection sampling kept nothing out of {len(jobs)} samples ({reasons}); "
                          "the model needs more training first, or raise k")
    return out
