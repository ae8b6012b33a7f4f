"""Pretraining: a DeepSeek-V3-style base model on a corpus generated from tasks (and/or user text files).

    nanor1 pretrain out_dir=runs/base steps=500          # or: from nanor1.pretrain import pretrain
The base model learns the domain (problems, direct answers, worked solutions) without being taught the R1
output format, except in the small tagged share of the corpus that lets RL find it (SPEEDRUN-NOTES.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanor1.checkpoint import save_checkpoint, write_manifest
from nanor1.common import NanoR1Error
from nanor1.config import to_dict
from nanor1.corpus import CorpusMix, pretrain_documents
from nanor1.data import build_token_stream, read_text_documents, stream_batch, window_starts
from nanor1.model import ModelConfig, Transformer
from nanor1.metrics import TrackingConfig
from nanor1.tasks import get_task
from nanor1.train import start_run, LoopConfig, OptimConfig, train_loop


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    model: str = "speedrun"  # preset name
    model_overrides: dict = field(default_factory=dict)  # e.g. {dim: 128}
    tokenizer: str = ""  # a tokenizer folder; empty: train one on the corpus (saved to out_dir/tokenizer)
    vocab_size: int = 512
    task: str = "chain_sum"  # corpus generated from this task; empty: only data_files
    task_options: dict = field(default_factory=dict)  # e.g. {terms: 8} for chain_sum (`nanor1 tasks` lists them)
    n_docs: int = 40_000
    mix: CorpusMix = field(default_factory=CorpusMix)  # shares of each document kind in the task corpus
    # Annealing (Llama 3 section 3.1.3): the last anneal_steps steps draw from a second task corpus of
    # anneal_docs documents in anneal_mix, richer in worked solutions, as the learning rate decays.
    anneal_steps: int = 0
    anneal_docs: int = 10_000
    anneal_mix: CorpusMix = field(default_factory=lambda: CorpusMix(direct=0.10, worked=0.55, tagged_direct=0.10,
                                                                   tagged_reasoning=0.10, facts=0.15))
    data_files: list[str] = field(default_factory=list)  # .txt (blank-line separated) or .jsonl {"text"}
    val_fraction: float = 0.02
    batch_size: int = 64
    seq_len: int = 128
    steps: int = 500
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int = 200
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    compile: bool = False
    resume: bool = False
    progress: bool = True
    stage: str = "pretrain"  # the name in logs and manifests (the speedrun has base and student-base)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        self.optim.validate()
        self.mix.validate()
        for name in ("batch_size", "seq_len", "steps", "grad_accum", "log_every", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise NanoR1Error(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.task and not self.data_files:
            raise NanoR1Error("nothing to train on: set task=... or data_files=[...]")
        if self.anneal_steps:
            self.anneal_mix.validate()
            if not 0 < self.anneal_steps < self.steps:
                raise NanoR1Error(f"anneal_steps={self.anneal_steps} must be between 0 and steps={self.steps}")
            if not self.task or self.anneal_docs < 10:
                raise NanoR1Error("annealing draws from a task corpus: set task=... and anneal_docs >= 10")
        if not 0 < self.val_fraction < 0.5:
            raise NanoR1Error(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        ModelConfig.preset(self.model, **self.model_overrides)


def corpus_documents(cfg: PretrainConfig) -> list[str]:
    docs: list[str] = []
    if cfg.task:
        docs += pretrain_documents(get_task(cfg.task, **cfg.task_options), cfg.n_docs, cfg.seed, cfg.mix)
    for f in cfg.data_files:
        docs += list(read_text_documents(f))
    random.Random(cfg.seed).shuffle(docs)
    return docs


def get_tokenizer(cfg: PretrainConfig, docs: list[str], out_dir: Path):
    from nanor1.tokenizer import load_tokenizer, train_tokenizer
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), Path(cfg.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "manifest.json").is_file():
        return load_tokenizer(tok_dir), tok_dir
    tok = train_tokenizer(docs, cfg.vocab_size, merge_across_words=bool(cfg.task))
    tok.save(tok_dir)
    write_manifest(tok_dir, "tokenizer", config={"vocab_size": cfg.vocab_size, "task": cfg.task,
                                                 "data_files": cfg.data_files}, seeds={"corpus": cfg.seed})
    return tok, tok_dir


def pretrain(cfg: PretrainConfig) -> Path:
    """Train a base model; returns its checkpoint folder (out_dir/final)."""
    out_dir, device, dtype = start_run(cfg)
    docs = corpus_documents(cfg)
    if len(docs) < 10:
        raise NanoR1Error(f"only {len(docs)} documents: too few to train on (n_docs or data_files)")
    tok, tok_dir = get_tokenizer(cfg, docs, out_dir)
    mcfg = ModelConfig.preset(cfg.model, **{"vocab_size": tok.vocab_size, **cfg.model_overrides})
    if mcfg.vocab_size < tok.vocab_size:
        raise NanoR1Error(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if cfg.seq_len > mcfg.max_seq_len:
        raise NanoR1Error(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    n_val = max(1, int(len(docs) * cfg.val_fraction))
    train = build_token_stream(docs[n_val:], tok, out_dir / "data", "train")
    val = build_token_stream(docs[:n_val], tok, out_dir / "data", "val")
    if cfg.batch_size * (cfg.seq_len + 1) > len(train):
        raise NanoR1Error(f"batch_size x seq_len ({cfg.batch_size} x {cfg.seq_len}) is larger than the training "
                          f"data ({len(train)} tokens); lower them or add data")
    train_starts = window_starts(train, tok.bos_id, cfg.seq_len)
    anneal, anneal_starts, anneal_from = train, train_starts, cfg.steps - cfg.anneal_steps
    if cfg.anneal_steps:
        anneal_docs = pretrain_documents(get_task(cfg.task, **cfg.task_options), cfg.anneal_docs, cfg.seed + 1,
                                         cfg.anneal_mix)
        anneal = build_token_stream(anneal_docs, tok, out_dir / "data", "anneal")
        anneal_starts = window_starts(anneal, tok.bos_id, cfg.seq_len)

    def batch(step: int, micro: int):
        data, starts = (anneal, anneal_starts) if step >= anneal_from else (train, train_starts)
        return stream_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, step, micro, starts=starts)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).init_weights(cfg.seed)

    val_len = min(cfg.seq_len, len(val) - 2)
    val_starts = window_starts(val, tok.bos_id, val_len)

    @torch.no_grad()
    def val_loss() -> float:
        losses = []
        for i in range(4):
            x, y = stream_batch(val, min(cfg.batch_size, 32), val_len, cfg.seed + 1, i, starts=val_starts)
            from nanor1.common import autocast
            with autocast(device, dtype):
                losses.append(model(x.to(device), y.to(device)).lm_loss.item())
        return sum(losses) / len(losses)

    loop = LoopConfig(steps=cfg.steps, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                      eval_every=cfg.eval_every, ckpt_every=cfg.ckpt_every, seed=cfg.seed, tracking=cfg.tracking)
    ckpt_kwargs = dict(tokenizer=tok, kind=cfg.stage, run_config=to_dict(cfg), parent=tok_dir,
                       seeds={"seed": cfg.seed})
    train_loop(model, batch, loop, cfg.optim, out_dir, device=device, dtype=dtype, stage=cfg.stage, eval_loss=val_loss,
               resume=cfg.resume, ckpt_kwargs=ckpt_kwargs, show_progress=cfg.progress, compile=cfg.compile)
    return save_checkpoint(out_dir / "final", model, **ckpt_kwargs)  # written from a CPU copy
