"""Distillation (DeepSeek-R1 section 2.4): fine-tune a smaller student on a teacher's correct reasoning traces.

    nanor1 distill teacher=runs/r1/final student=runs/student-base/final out_dir=runs/distill
    nanor1 distill traces=runs/rs/data.jsonl student=...            # or from an existing trace file
The traces come from rejection sampling the teacher (only correct, readable ones), then plain SFT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nanor1.common import NanoR1Error
from nanor1.rejection import RejectionConfig, rejection_sample
from nanor1.sft import SFTConfig, sft
from nanor1.train import OptimConfig, Optimizer


@dataclass
class DistillConfig:
    teacher: str = ""  # any nanor1 or local Hugging Face model
    traces: str = ""  # an existing {"messages": ...} JSONL instead of a teacher
    student: str = ""  # a nanor1 checkpoint to fine-tune
    out_dir: str = "runs/distill"
    # a small student learns a task's steps only after a few hundred steps on ~2000 traces, and then at once; a
    # teacher nearly always writes the same right trace, so one sample per problem (docs/speedrun.md, ninth
    # calibration: AdamW at 1e-3 needed 1500 steps where Muon at 5e-3 needed 600)
    sampling: RejectionConfig = field(default_factory=lambda: RejectionConfig(n_problems=2000, k=1))
    training: SFTConfig = field(default_factory=lambda: SFTConfig(
        steps=1200, stage="distill", optim=OptimConfig(optimizer=Optimizer.MUON, lr=5e-3, warmup_steps=10)))

    def validate(self) -> None:
        if not self.student:
            raise NanoR1Error("no student given: set student=<checkpoint folder>")
        if bool(self.teacher) == bool(self.traces):
            raise NanoR1Error("give exactly one of teacher=<model> or traces=<file.jsonl>")


def distill(cfg: DistillConfig, teacher_policy=None) -> Path:
    """Traces from the teacher (or file), then SFT of the student; returns the student's final folder."""
    cfg.validate()
    traces = cfg.traces
    if not traces:
        sampling = dataclasses.replace(cfg.sampling, model=cfg.teacher, out=str(Path(cfg.out_dir) / "traces.jsonl"))
        traces = str(rejection_sample(sampling, policy=teacher_policy))
    training = dataclasses.replace(cfg.training, model=cfg.student, data=traces, out_dir=cfg.out_dir)
    return sft(training)
