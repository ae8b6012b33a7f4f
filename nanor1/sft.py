"""Supervised fine-tuning on chat examples, loss on assistant tokens only (R1's cold start and its SFT rounds).

    nanor1 sft model=runs/base/final out_dir=runs/sft              # cold-start data generated from a task
    nanor1 sft model=... data=traces.jsonl                          # or any {"messages": [...]} JSONL
Distillation and the rejection-sampling round reuse `sft()` with their own data files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanor1.checkpoint import save_checkpoint
from nanor1.common import NanoR1Error
from nanor1.config import to_dict
from nanor1.data import SFTData, read_sft_jsonl
from nanor1.metrics import TrackingConfig
from nanor1.train import start_run, LoopConfig, OptimConfig, train_loop


@dataclass
class SFTConfig:
    model: str = ""  # a nanor1 checkpoint folder (or a DeepSeek-V3-layout HF folder)
    out_dir: str = "runs/sft"
    data: str = ""  # JSONL of {"messages": [...]}; empty: cold-start examples generated from `task`
    task: str = "chain_sum"
    task_options: dict = field(default_factory=dict)
    n_examples: int = 2000
    max_len: int = 192
    batch_size: int = 32
    steps: int = 200
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1))
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"
    resume: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile the model, as pretraining's compile does (see nanor1.train.train_loop)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stage: str = "sft"  # the name in logs and manifests (the speedrun uses sft-cold, sft-rs, distill)

    def validate(self) -> None:
        self.optim.validate()
        if not self.model:
            raise NanoR1Error("no model given: set model=<checkpoint folder>")
        for name in ("batch_size", "steps", "max_len", "grad_accum", "n_examples"):
            if getattr(self, name) < 1:
                raise NanoR1Error(f"{name} must be >= 1, got {getattr(self, name)}")


def load_examples(cfg: SFTConfig) -> list[dict]:
    if cfg.data:
        return read_sft_jsonl(cfg.data)
    from nanor1.corpus import sft_examples
    from nanor1.tasks import get_task
    return sft_examples(get_task(cfg.task, **cfg.task_options), cfg.n_examples, cfg.seed)


def sft(cfg: SFTConfig, model=None, tokenizer=None) -> Path:
    """Fine-tune `cfg.model` (or the given in-memory model) on chat examples; returns out_dir/final."""
    from nanor1.policy import load_nanor1
    out_dir, device, dtype = start_run(cfg)
    if model is None:
        model, tokenizer = load_nanor1(cfg.model)
    if cfg.max_len > model.cfg.max_seq_len:
        raise NanoR1Error(f"max_len {cfg.max_len} exceeds the model's context of {model.cfg.max_seq_len}")
    data = SFTData(load_examples(cfg), tokenizer, cfg.max_len + 1, cfg.batch_size, cfg.seed)
    if cfg.batch_size > len(data.items):
        raise NanoR1Error(f"batch_size {cfg.batch_size} is larger than the {len(data.items)} usable examples")
    torch.manual_seed(cfg.seed)
    loop = LoopConfig(steps=cfg.steps, grad_accum=cfg.grad_accum, log_every=cfg.log_every,
                      eval_every=10 ** 9, ckpt_every=cfg.ckpt_every, seed=cfg.seed, tracking=cfg.tracking)
    data_dir = Path(cfg.data).parent if cfg.data else None
    ckpt_kwargs = dict(tokenizer=tokenizer, kind=cfg.stage, run_config=to_dict(cfg), parent=cfg.model or None,
                       seeds={"seed": cfg.seed},
                       inputs={"data": data_dir} if data_dir and (data_dir / "manifest.json").is_file() else None)
    train_loop(model, lambda step, micro: data.batch(step, micro, cfg.grad_accum), loop, cfg.optim, out_dir,
               device=device, dtype=dtype, stage=cfg.stage, resume=cfg.resume, ckpt_kwargs=ckpt_kwargs,
               show_progress=cfg.progress, compile=cfg.compile)
    return save_checkpoint(out_dir / "final", model, **ckpt_kwargs)  # written from a CPU copy
