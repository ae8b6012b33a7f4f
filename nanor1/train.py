"""The shared optimisation loop used by pretraining, SFT and distillation.

AdamW (or Muon for the matrices) with warmup + cosine or WSD decay, gradient accumulation, clipping, bf16
autocast, MoE bias updates, progress bar (loss, tokens/s, MFU, ETA), metrics.jsonl, periodic held-out loss,
atomic checkpoints and an exact `--resume`: batches are a pure function of (seed, step), and optimizer and RNG
state are restored.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nanor1.checkpoint import latest_checkpoint, load_train_state, save_run_checkpoint
from nanor1.common import NanoR1Error, autocast, peak_flops, progress
from nanor1.metrics import MetricsSink, TrackingConfig
from nanor1.model import Transformer
from nanor1.muon import Muon, Optimizers


class Schedule(enum.Enum):
    COSINE = "cosine"  # warmup, then cosine decay to min_lr (GPT-3 style)
    WSD = "wsd"  # warmup-stable-decay: flat, then a linear cool-down over the last decay_frac (MiniCPM)
    CONSTANT = "constant"


class Optimizer(enum.Enum):
    ADAMW = "adamw"
    MUON = "muon"  # Muon for the hidden matrices, AdamW for embeddings, output head and vectors (nanor1.muon)


@dataclass
class OptimConfig:
    optimizer: Optimizer = Optimizer.ADAMW
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Schedule = Schedule.COSINE
    decay_frac: float = 0.2  # WSD only
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def validate(self) -> None:
        if not self.lr > 0:
            raise NanoR1Error(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise NanoR1Error(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise NanoR1Error("warmup_steps, weight_decay and grad_clip must be >= 0")


def start_run(cfg) -> tuple[Path, torch.device, torch.dtype]:
    """What every training stage does first: check the config, use every core, create out_dir and record
    the resolved config there. Returns (out_dir, device, dtype)."""
    from nanor1.common import resolve_device, resolve_dtype, tune_cpu
    from nanor1.config import save_config
    cfg.validate()
    tune_cpu()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    return out_dir, resolve_device(cfg.device), resolve_dtype(cfg.dtype)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule is Schedule.CONSTANT:
        return cfg.lr
    if cfg.schedule is Schedule.WSD:
        decay_start = int(total * (1 - cfg.decay_frac))
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (min_lr - cfg.lr) * (step - decay_start) / max(1, total - decay_start)
    progress_ = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW; matrices decay, vectors (norms) do not. With Muon, the hidden matrices (every matrix but the
    embeddings and the output head) go to Muon instead, with the same learning rate and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon: list[torch.nn.Parameter] = []
    if cfg.optimizer is Optimizer.MUON:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
        io = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) or m is head for p in m.parameters()}
        muon = [p for p in params if p.dim() >= 2 and id(p) not in io]
    on_muon = {id(p) for p in muon}
    rest = [p for p in params if id(p) not in on_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one kernel over all parameters, 2.6x faster than the foreach step on this CPU (3.3M parameters)
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    adamw.register_step_post_hook(_mark_changed)
    if not muon:
        return adamw
    muon_opt = Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay)
    muon_opt.register_step_post_hook(_mark_changed)
    return Optimizers(muon_opt, adamw)


def _mark_changed(optimizer: torch.optim.Optimizer, *_) -> None:
    """Bump the version counter of every parameter a step changed. PyTorch's fused AdamW writes the parameters
    without bumping it, and inference caches key on it (`nanor1.common.version_key`: MLA's gathered projection
    rows, FastLlama's packed weights): without this, GRPO sampling from the policy itself (rollout_dtype float32)
    kept decoding with weights from before the first update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            torch.autograd.graph.increment_version(p)


def flops_per_token(model: Transformer, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters used in matmuls per token + attention scores (Kaplan et al.
    2020; PaLM appendix B). The embedding lookup is not a matmul; the output head is, once per MTP depth too."""
    cfg = model.cfg
    counts = cfg.param_counts()
    head = cfg.vocab_size * cfg.dim
    matmul = counts["active"] - (0 if cfg.tie_embeddings else head)  # drop the embedding table, keep the head
    matmul += cfg.n_mtp_layers * head + (counts["mtp"] if cfg.n_mtp_layers else 0)
    attn = 6 * (cfg.n_layers + cfg.n_mtp_layers) * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6 * matmul + attn


@dataclass
class LoopConfig:
    steps: int
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 50
    ckpt_every: int = 200
    seed: int = 0
    tracking: TrackingConfig | None = None  # TensorBoard / W&B besides metrics.jsonl


# (inputs, targets with -100 where no loss[, True on real input tokens: padding never counts toward the MoE loads]),
# each (B, T)
Batch = tuple[torch.Tensor, ...]


def train_loop(model: Transformer, get_batch: Callable[[int, int], Batch], loop: LoopConfig, optim: OptimConfig,
               run_dir: str | Path, *, device: torch.device, dtype: torch.dtype, stage: str,
               eval_loss: Callable[[], float] | None = None, resume: bool = False, ckpt_kwargs: dict | None = None,
               show_progress: bool = True, compile: bool = False) -> dict:
    """Train `model` for loop.steps optimizer steps. get_batch(step, micro) must be a pure function of its
    arguments so that a resumed run sees exactly the batches an uninterrupted one would."""
    run_dir = Path(run_dir)
    model.to(device).train()
    optimizer = make_optimizer(model, optim)
    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise NanoR1Error(f"{run_dir}: nothing to resume (no ckpt/latest); run without --resume")
        from nanor1.checkpoint import load_model
        model.load_state_dict(load_model(ckpt).state_dict())
        state = load_train_state(ckpt, optimizer)
        start = int(state["step"])
    forward = torch.compile(model) if compile else model  # same parameters; checkpoints save `model`
    log = MetricsSink(run_dir, loop.tracking, name=stage, config=(ckpt_kwargs or {}).get("run_config"))
    ckpt_kwargs = dict(ckpt_kwargs or {})
    seq_len = get_batch(0, 0)[0].shape[1]
    fpt = flops_per_token(model, seq_len)
    peak = peak_flops(device, dtype)
    bar = progress(total=loop.steps, desc=stage, unit="step", disable=not show_progress)
    bar.update(start)
    last: dict = {}
    t_log, tokens_since = time.perf_counter(), 0
    for step in range(start, loop.steps):
        lr = lr_at(step, loop.steps, optim)
        for g in optimizer.param_groups:
            g["lr"] = lr
        parts = {"loss": 0.0, "lm_loss": 0.0, "mtp_loss": 0.0}
        for micro in range(loop.grad_accum):
            x, y, *real = (t.to(device) for t in get_batch(step, micro))
            with autocast(device, dtype):
                out = forward(x, y, real[0] if real else None)
            (out.loss / loop.grad_accum).backward()
            parts["loss"] += out.loss.item() / loop.grad_accum
            parts["lm_loss"] += out.lm_loss.item() / loop.grad_accum
            if out.mtp_loss is not None:
                parts["mtp_loss"] += out.mtp_loss.item() / loop.grad_accum
            tokens_since += x.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NanoR1Error(f"{stage}: the loss diverged at step {step} (gradient norm {grad_norm}); "
                              "lower the learning rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        balance = model.update_moe_bias()
        bar.update(1)
        if (step + 1) % loop.log_every == 0 or step + 1 == loop.steps:
            dt = time.perf_counter() - t_log
            tps = tokens_since / dt
            last = {"stage": stage, "step": step + 1, "lr": lr, "grad_norm": float(grad_norm), **parts,
                    "tokens_per_s": tps, "mfu": tps * fpt / peak, **balance}
            if eval_loss is not None and ((step + 1) % loop.eval_every == 0 or step + 1 == loop.steps):
                model.eval()
                last["val_loss"] = eval_loss()
                model.train()
            log.log(**last)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{last['mfu']:.1%}")
            t_log, tokens_since = time.perf_counter(), 0
        if (step + 1) % loop.ckpt_every == 0 and step + 1 < loop.steps:
            save_run_checkpoint(run_dir, step + 1, model, optimizer=optimizer, train_state={"step": step + 1},
                                **ckpt_kwargs)
    bar.close()
    log.close()
    model.eval()
    return last
