"""GRPO (DeepSeekMath section 4.1; DeepSeek-R1 section 2.2): reinforcement learning with verifiable rewards.

    nanor1 grpo model=runs/base/final out_dir=runs/r1zero steps=80      # R1-Zero: RL straight from a base
Each step samples G completions for each of `prompts_per_step` problems with the engine, scores them with the
rule-based rewards, turns rewards into group-relative advantages and takes `mu` clipped policy-gradient
steps (nanor1/rl.py has the math). Works for nanor1 models and any local Hugging Face causal LM.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nanor1.checkpoint import latest_checkpoint, load_train_state, save_run_checkpoint
from nanor1.common import SHAPE_MULTIPLE, JsonlLogger, NanoR1Error, autocast, progress, resolve_dtype, round_up
from nanor1.config import to_dict
from nanor1.engine import Completion, SamplingParams
from nanor1.metrics import MetricsSink, TrackingConfig
from nanor1.replay import Recording, bytes_per_token
from nanor1.rewards import RewardConfig, compute_rewards
from nanor1.rl import GRPOLossConfig, gather_logprobs, group_advantages, policy_loss, token_entropy, \
    zero_variance_groups
from nanor1.templates import Template, render_prompt
from nanor1.train import start_run, OptimConfig, Schedule, lr_at, make_optimizer


@dataclass
class GRPOConfig:
    model: str = ""  # the starting policy: nanor1 checkpoint/run folder or local HF model
    out_dir: str = "runs/grpo"
    task: str = "chain_sum"
    task_options: dict = field(default_factory=dict)
    template: Template = Template.R1_ZERO
    steps: int = 80
    prompts_per_step: int = 16
    group_size: int = 8  # G
    max_new_tokens: int = 96
    temperature: float = 1.0  # rollout temperature; log-probs use the same one so the ratio starts at 1
    top_p: float = 1.0
    mu: int = 1  # policy updates per batch of rollouts (1 = strictly on-policy)
    micro_batch: int = 64  # sequences per forward/backward, rounded down to whole groups (at least one)
    loss: GRPOLossConfig = field(default_factory=lambda: GRPOLossConfig(beta=0.0))
    rewards: RewardConfig = field(default_factory=RewardConfig)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal (they carry no signal)
    overlong_filter: bool = False  # DAPO: no loss on truncated completions (their reward is noise)
    # without a KL term (loss.beta = 0), groups whose advantages are all zero (equal rewards) or that have no token
    # under the mask add exactly nothing to the loss and its gradient: the update skips their forward and backward
    # (not for a nanor1 MoE policy whose balancing bias moves: that counts every token's expert; docs/grpo.md)
    skip_zero_advantage: bool = True
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=0, weight_decay=0.0,
                                                                    schedule=Schedule.CONSTANT))
    sample_every: int = 10
    ckpt_every: int = 20
    time_budget_s: float = 0.0  # > 0: stop after this many seconds (to match another run's compute)
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"  # autocast for the policy-gradient forward/backward
    # weights the engine samples with: "bfloat16" samples from a copy of the policy in bf16, refreshed before
    # each rollout (faster matmuls, as vLLM-style trainers do); old log-probs are recomputed in training
    # numerics either way, so the update is unchanged; nanor1's own decode gains little from it on CPUs
    rollout_dtype: str = "float32"
    # a Llama-family policy's update forward (and the old and reference log-probs) under torch.compile, 1.2-1.4x
    # faster on this CPU after ~1-2 min of compiling in the first steps, so it pays only in long runs; its rollout's
    # decode steps too, except where nanor1's CPU decode kernels run them (bf16 rollouts on CPUs with AVX-512 BF16,
    # faster than compiled: nanor1/cpu_decode.py). nanor1 policies refuse it (docs/grpo.md)
    compile: bool = False
    # with mu = 1 the update takes its forward's matmul outputs from the rollout, which computed the same ones,
    # instead of computing them again (a Llama-family policy; nanor1/replay.py), when they take at most this many
    # GiB (0: never): a third of the update's matmuls saved
    replay_gib: float = 2.0
    resume: bool = False
    progress: bool = True
    stage: str = "grpo"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self.loss.validate()
        self.optim.validate()
        self.rewards.validate()
        if not self.model:
            raise NanoR1Error("no model given: set model=<checkpoint folder or HF model folder>")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu", "micro_batch", "sample_every",
                     "ckpt_every"):
            if getattr(self, name) < 1:
                raise NanoR1Error(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise NanoR1Error(f"group_size must be >= 2 (advantages compare completions within a group), "
                              f"got {self.group_size}")
        if self.temperature <= 0:
            raise NanoR1Error("GRPO samples: temperature must be > 0")
        if self.replay_gib < 0:
            raise NanoR1Error(f"replay_gib must be >= 0 (0 turns replaying the rollout off), got {self.replay_gib}")
        resolve_dtype(self.rollout_dtype)


# ----------------------------------------------------------------------------- one batch of rollouts

@dataclass
class Rollouts:
    """A step's samples: n prompts, each continued by G completions (completion i continues prompt i // G)."""
    prompts: torch.Tensor  # (n, P) right-padded
    prompt_lens: torch.Tensor  # (n,)
    targets: torch.Tensor  # (N, C) completion tokens + stop token, right-padded; the policy scores these
    mask: torch.Tensor  # (N, C) True on tokens that take loss
    real: torch.Tensor  # (N, C) True on real tokens
    rewards: dict[str, list[float]]
    completions: list[Completion]
    recording: Recording | None = None  # the rollout's matmul outputs, for the update to replay


def build_batch(prompts: list[list[int]], comps: list[Completion], pad_id: int, overlong_filter: bool,
                multiple: int = 1):
    """Token tensors for the policy forward: the n prompts once, and each completion with its stop token; the
    widths are padded up to `multiple` (see nanor1.common.SHAPE_MULTIPLE)."""
    seqs = [c.ids + ([c.stop_token_id] if c.stop_token_id is not None else []) for c in comps]
    P, C = round_up(max(len(p) for p in prompts), multiple), round_up(max(1, max(len(s) for s in seqs)), multiple)
    prompt_ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, : len(p)] = torch.tensor(p)
    targets = torch.full((len(seqs), C), pad_id, dtype=torch.long)
    real = torch.zeros(len(seqs), C, dtype=torch.bool)
    for i, s in enumerate(seqs):
        targets[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        real[i, : len(s)] = True
    drop = torch.tensor([overlong_filter and c.finish_reason == "length" for c in comps])
    return prompt_ids, torch.tensor([len(p) for p in prompts]), targets, real & ~drop[:, None], real


def rollout(policy, engine, task, problems, cfg: GRPOConfig, step: int, record: bool = False):
    """Sample G completions per problem and score them. `record`: the engine (its backend a FastLlama, see
    `Policy.replays`) also records its matmul outputs, if they fit in cfg.replay_gib."""
    from nanor1.tokenizer import encode_prompt
    tok = policy.tokenizer
    prompts = [encode_prompt(tok, render_prompt(p.question, cfg.template, tok)) for p in problems]
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > policy.max_seq_len:
        raise NanoR1Error(f"a prompt of {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                          f"model's context of {policy.max_seq_len}; lower max_new_tokens or use shorter prompts")
    G = cfg.group_size
    prompts_g = [p for p in prompts for _ in range(G)]  # the engine samples each row; the update shares prompts
    params = [SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             seed=hash((cfg.seed, step, i)) & (2 ** 62 - 1)) for i in range(len(prompts_g))]
    recording = None
    if record and bytes_per_token(engine.backend.model.hf) * (len(prompts) * round_up(longest) + len(
            prompts_g) * cfg.max_new_tokens) <= cfg.replay_gib * 2 ** 30:
        recording = engine.backend.recording = Recording()
    try:
        comps = engine.generate(prompts_g, params)
    finally:
        if recording is not None:
            engine.backend.recording = None
    problems_g = [p for p in problems for _ in range(G)]
    rewards = compute_rewards([c.text for c in comps], problems_g, task, cfg.rewards,
                              n_tokens=[len(c.ids) for c in comps])
    return Rollouts(*build_batch(prompts, comps, tok.pad_id or 0, cfg.overlong_filter, SHAPE_MULTIPLE), rewards,
                    comps, recording if recording is not None and recording.complete else None)


# ----------------------------------------------------------------------------- the loop

def update_chunks(adv: torch.Tensor, mask: torch.Tensor, group_size: int, groups_per_chunk: int,
                  skip_silent: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The update's micro-batches as (prompt indices, completion indices), whole groups each (a group's completions
    share their prompt). `skip_silent` leaves out the groups that cannot move the loss: every advantage exactly 0
    (all rewards equal) or no token under the mask. Without a KL term their per-token objective is exactly 0
    (min(rho * 0, clip(rho) * 0)), so the loss, its gradient and the clip fraction are the same without them."""
    groups = torch.arange(adv.numel() // group_size)
    if skip_silent:
        live = (adv.view(-1, group_size) != 0).any(1) & mask.reshape(len(groups), -1).any(1)
        groups = groups[live]
    rows = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    return [(groups[i:i + groups_per_chunk], rows[i * group_size:(i + groups_per_chunk) * group_size])
            for i in range(0, len(groups), groups_per_chunk)]


def _logp(policy, ro: Rollouts, prompts: torch.Tensor, seqs: torch.Tensor, temperature, device, dtype,
          compile: bool, replay: bool = False):
    """Log-probs (and logits) of the completions `seqs`, which continue `prompts`, each prompt run once.
    `replay`: the forward's matmul outputs come from the rollout's recording."""
    lens, real = ro.prompt_lens[prompts], ro.real[seqs]
    # the chunk's widths, padded as build_batch padded the whole batch's: a few shapes recur (SHAPE_MULTIPLE)
    C = min(round_up(max(1, int(real.sum(1).max()))), ro.targets.shape[1])
    P = min(round_up(int(lens.max())), ro.prompts.shape[1])
    y = ro.targets[seqs, :C].to(device)
    recorded = None
    if replay:
        G = len(ro.completions) // len(ro.prompt_lens)
        recorded = ro.recording.replay(prompts * G, seqs, P, (lens - 1).to(device), C - 1,
                                       len(policy.model.model.layers))
    with autocast(device, dtype):
        logits = policy.continuation_logits(ro.prompts[prompts, :P].to(device), lens.to(device),
                                            y[:, :-1], real[:, : C - 1].to(device), compile, recorded)
    return gather_logprobs(logits, y, temperature=temperature), logits


def _sampler(policy, dtype: torch.dtype):
    """The policy the engine samples from: itself, or a frozen copy in `dtype` that each step refreshes."""
    if next(policy.model.parameters()).dtype == dtype:
        return policy
    return replace(policy, model=copy.deepcopy(policy.model).to(dtype).eval().requires_grad_(False))


@torch.no_grad()
def _sync(sampling_copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give the sampling copy the policy's current weights (in its own dtype)."""
    for mine, theirs in zip(sampling_copy.parameters(), model.parameters()):
        mine.copy_(theirs)


def grpo(cfg: GRPOConfig, policy=None, on_step=None) -> Path:
    """Run GRPO from `cfg.model` (or an in-memory Policy); returns the final policy's folder. `on_step`, if given,
    is called with each step's metrics row once it is logged (bench/grpo_bench.py times steps with it)."""
    from nanor1.policy import COMPILE_REFUSED, load_policy
    from nanor1.tasks import get_task
    out_dir, device, dtype = start_run(cfg)
    start = 0
    resume_from = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise NanoR1Error(f"{out_dir}: nothing to resume (no ckpt/latest); run without resume=true")
    if resume_from is not None:
        policy = load_policy(resume_from, device)
    elif policy is None:
        policy = load_policy(cfg.model, device)
    if cfg.compile and policy.kind == "nanor1":  # Policy.continuation_logits refuses it too; say so before sampling
        raise NanoR1Error(COMPILE_REFUSED)
    task = get_task(cfg.task, **cfg.task_options)
    model = policy.model
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.loss.needs_ref else None
    ref_policy = replace(policy, model=ref)
    if ref is not None and resume_from is not None:
        ref.load_state_dict(load_policy(cfg.model, device).model.state_dict())
    optimizer = make_optimizer(model, cfg.optim)
    # skipping groups is exact without a KL term, and unless a MoE balancing bias counts their tokens' experts
    balancing = policy.kind == "nanor1" and any(m.bias_update_speed > 0 for m in model.moe_layers())
    skip = cfg.skip_zero_advantage and ref is None and not balancing
    if resume_from is not None:
        start = int(load_train_state(resume_from, optimizer)["step"])
    G, n_seq = cfg.group_size, cfg.prompts_per_step * cfg.group_size
    sampler = _sampler(policy, resolve_dtype(cfg.rollout_dtype))
    engine = sampler.engine(max_batch=n_seq, seed=cfg.seed, compile=cfg.compile)
    # only with mu = 1: later updates divide by the old log-probs, which must share their (training) numerics
    replays = cfg.replay_gib > 0 and cfg.mu == 1 and policy.replays(engine, sampler.max_seq_len)
    log = MetricsSink(out_dir, cfg.tracking, name=cfg.stage, config=to_dict(cfg))
    samples = JsonlLogger(out_dir / "samples.jsonl")
    ckpt_kwargs = dict(kind=cfg.stage, run_config=to_dict(cfg), parent=cfg.model, seeds={"seed": cfg.seed})
    budget = cfg.time_budget_s > 0  # the bar's total is then the steps the remaining time allows, re-estimated
    bar = progress(total=None if budget else cfg.steps, desc=cfg.stage, unit="step", disable=not cfg.progress)
    bar.update(start)
    t_start = time.perf_counter()
    for step in range(start, cfg.steps):
        if cfg.time_budget_s > 0 and time.perf_counter() - t_start > cfg.time_budget_s:
            break
        problems = task.problems("train", cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step)
        if not problems:
            raise NanoR1Error(f"task {cfg.task!r} has no training problems")
        t0 = time.perf_counter()
        model.eval()
        if sampler is not policy:
            _sync(sampler.model, model)
        ro = rollout(policy, engine, task, problems, cfg, step, record=replays)
        t_roll = time.perf_counter() - t0
        total = torch.tensor(ro.rewards["total"])
        adv = group_advantages(total, G, cfg.loss.adv_scale).flatten()
        flat, zero_frac = zero_variance_groups(total, G)
        mask = ro.mask.clone()
        if cfg.dynamic_sampling:
            mask &= ~flat.repeat_interleave(G)[:, None]
        # one update per mu: old log-probs are the rollout policy's, recomputed in training numerics (with mu = 1
        # the update's own, whose forward may replay the rollout's)
        replay = ro.recording is not None
        t1 = time.perf_counter()
        model.train()
        chunks = update_chunks(adv, mask, G, max(1, cfg.micro_batch // G), skip)
        old, refs = [None] * len(chunks), [None] * len(chunks)
        with torch.no_grad():
            for j, (ps, sl) in enumerate(chunks):
                if cfg.mu > 1:
                    old[j] = _logp(policy, ro, ps, sl, cfg.temperature, device, dtype, cfg.compile)[0]
                if ref is not None:
                    refs[j] = _logp(ref_policy, ro, ps, sl, cfg.temperature, device, dtype, cfg.compile)[0]
        lr = lr_at(step, cfg.steps, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = lr
        n_tokens = int(mask.sum())
        stats_acc: dict[str, float] = {"loss": 0.0, "clip_frac": 0.0}  # what skipped groups add to each
        if not chunks:  # the entropy is still watched (a collapsing policy): over the first group, without gradients
            first = torch.arange(G)  # the first prompt's completions
            with torch.no_grad():
                logits = _logp(policy, ro, torch.arange(1), first, cfg.temperature, device, dtype, cfg.compile)[1]
            stats_acc["entropy"] = float(token_entropy(logits, mask[first, : logits.shape[1]].to(device)))
        for _ in range(cfg.mu):
            for j, (ps, sl) in enumerate(chunks):
                logp, logits = _logp(policy, ro, ps, sl, cfg.temperature, device, dtype, cfg.compile, replay)
                m = mask[sl, : logp.shape[1]].to(device)
                loss, stats = policy_loss(logp, old[j] if old[j] is not None else logp.detach(), adv[sl].to(device),
                                          m, eps_low=cfg.loss.eps_low, eps_high=cfg.loss.eps_high, ref_logp=refs[j],
                                          beta=cfg.loss.beta, loss_agg=cfg.loss.loss_agg,
                                          max_len=cfg.max_new_tokens, num_seqs=n_seq, num_tokens=max(1, n_tokens))
                if n_tokens:
                    loss.backward()
                w = float(m.sum()) / max(1, n_tokens)
                for k in ("clip_frac", "kl"):
                    if k in stats:
                        stats_acc[k] = stats_acc.get(k, 0.0) + float(stats[k]) * w / cfg.mu
                stats_acc["loss"] += loss.item() / cfg.mu
                if j == 0:  # of the first micro-batch the update ran
                    stats_acc["entropy"] = float(token_entropy(logits.detach(), m))
            if n_tokens and not chunks:  # every group skipped: the gradient is zero, and AdamW still steps on it
                for p in model.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):
                raise NanoR1Error(f"{cfg.stage}: gradient became non-finite at step {step}; lower the learning rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ro.recording = None  # replayed: free it before the next rollout records
        if policy.kind == "nanor1":
            model.update_moe_bias()
        t_train = time.perf_counter() - t1
        lens = [len(c.ids) for c in ro.completions]
        row = {"stage": cfg.stage, "step": step + 1, "lr": lr, "grad_norm": float(grad_norm),
               "reward_mean": float(total.mean()), "reward_std": float(total.std()),
               **{f"reward/{k}": sum(v) / len(v) for k, v in ro.rewards.items() if k != "total"},
               **{f"reward_std/{k}": float(torch.tensor(v).std()) for k, v in ro.rewards.items() if k != "total"},
               "accuracy": sum(ro.rewards["accuracy"]) / n_seq, "format": sum(ro.rewards["format"]) / n_seq,
               "response_len": sum(lens) / n_seq, "zero_std_frac": zero_frac,
               "truncated_frac": sum(c.finish_reason == "length" for c in ro.completions) / n_seq,
               "rollout_tokens_per_s": sum(lens) / t_roll,
               "update_frac": sum(len(ps) for ps, _ in chunks) / cfg.prompts_per_step,  # groups the update ran
               "train_tokens_per_s": sum(int(ro.prompt_lens[ps].sum()) + int(ro.real[sl].sum())
                                         for ps, sl in chunks) / t_train,
               "rollout_s": t_roll, "train_s": t_train, **stats_acc}
        log.log(**row)
        if on_step is not None:
            on_step(row)
        if (step + 1) % cfg.sample_every == 0 or step == start:
            for i in range(0, n_seq, G)[:4]:
                samples.log(stage=cfg.stage, step=step + 1, prompt=problems[i // G].question,
                            answer=problems[i // G].answer, completion=ro.completions[i].text,
                            reward=ro.rewards["total"][i])
        bar.update(1)
        if budget:
            elapsed = time.perf_counter() - t_start
            left = int(max(0.0, cfg.time_budget_s - elapsed) / (elapsed / (step + 1 - start)))
            bar.total = min(cfg.steps, step + 1 + left)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                        len=f"{row['response_len']:.0f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            save_run_checkpoint(out_dir, step + 1, save=lambda f: policy.save(
                f, optimizer=optimizer, train_state={"step": step + 1}, **ckpt_kwargs))
    bar.close()
    log.close()
    samples.close()
    model.eval()
    return policy.save(out_dir / "final", **ckpt_kwargs)
