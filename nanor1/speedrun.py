"""`nanor1 speedrun`: the whole R1 story at toy scale on a CPU, in minutes, with a report.

    nanor1 speedrun                 # ~15 min on 2 cores; `--quick` for a ~3 min smoke run
Tokenizer -> base model -> R1-Zero (GRPO from base) -> R1 (cold-start SFT -> GRPO -> rejection sampling ->
SFT) -> distillation into a smaller student (vs the same student trained by RL) -> evaluation of every stage
with R1's protocol -> report. Finished stages are skipped on a rerun, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanor1.checkpoint import MANIFEST, verify_manifest
from nanor1.common import NanoR1Error, atomic_write_json, read_json, tune_cpu
from nanor1.speedrun_report import base_reasoning_markdown, write_speedrun_report
from nanor1.templates import Template
from nanor1.train import Optimizer


@dataclass
class SpeedrunConfig:
    out_dir: str = "runs/speedrun"
    task: str = "chain_sum"
    # four 2-digit terms: a Muon-trained base sums six 1-digit terms directly (88-92% right), leaving R1-Zero no
    # room; these it answers directly 7% of the time and by reasoning 96% (docs/speedrun.md, eighth calibration)
    task_options: dict = dataclasses.field(default_factory=lambda: {"terms": 4, "digits": 2})
    seed: int = 0
    device: str = "auto"
    # sizes of each stage (the defaults take 13.5-15 minutes on the 2-core AVX-512 development CPU; docs/speedrun.md)
    pretrain_steps: int = 450
    pretrain_docs: int = 40_000
    pretrain_lr: float = 5e-3
    pretrain_optimizer: Optimizer = Optimizer.MUON  # AdamW's bases learned the chain on 1 seed of 4
    rl_steps: int = 40  # R1-Zero and the R1 RL stage take the same number of steps
    rl_prompts: int = 16
    rl_group: int = 8
    rl_lr: float = 1e-4  # 5e-5 (the feasibility run's) gave 25.6% strict after 50 steps here, 1e-4 30.2%
    max_new_tokens: int = 64
    cold_start_examples: int = 2000  # the base never saw the chat template: 40 or 80 steps left R1's rollouts at
    cold_start_steps: int = 120      # 6% and 41% accuracy, 120 steps at 93% (docs/speedrun.md)
    rs_problems: int = 300
    rs_k: int = 4
    rs_sft_steps: int = 40
    # the RL policy fine-tuned on its own kept samples: at the cold start's 1e-3 this SFT cost R1 15-20 points on
    # seeds 2 and 3 (95.4% -> 78.5%, 85.8% -> 66.0%); at the RL rate it gains (99.3%, 97.6%; docs/speedrun.md)
    rs_sft_lr: float = 1e-4
    # the student is dense and has no MTP module, like R1's Qwen and Llama students; its 150 pretraining steps
    # teach it the corpus but not 2-digit addition (0.5%), which it learns only from R1's traces
    student_dim: int = 128
    student_layers: int = 2
    student_pretrain_steps: int = 150
    distill_problems: int = 2000  # one trace each: R1 samples nearly the same right trace every time
    distill_k: int = 1
    # 600 distillation steps on these traces gave the student 19%, 1200 98% (docs/speedrun.md, ninth calibration);
    # Muon at the pretraining rate reaches in 600 steps what AdamW at 1e-3 reached in 1500
    distill_steps: int = 1200
    distill_lr: float = 5e-3
    distill_optimizer: Optimizer = Optimizer.MUON
    eval_problems: int = 200
    eval_k: int = 4

    @staticmethod
    def quick() -> "SpeedrunConfig":
        """The CI smoke run: every stage, every artifact, far smaller; the findings are not expected to hold.
        Its task is three 1-digit terms: after 60 pretraining steps a model answers four 2-digit terms right too
        rarely for 96 rejection samples to keep any, and the run would stop there on some seeds (seeds 0-2 keep
        4-13 of 96, and 2-8 distillation traces of 24, hence 96 distillation problems)."""
        return SpeedrunConfig(out_dir="runs/speedrun-quick", task_options={"terms": 3, "digits": 1},
                              pretrain_steps=60, pretrain_docs=6000, rl_steps=4,
                              rl_prompts=4, rl_group=4, max_new_tokens=64, cold_start_examples=400,
                              cold_start_steps=40, rs_problems=24, rs_k=4, rs_sft_steps=4, student_pretrain_steps=30,
                              distill_problems=96, distill_steps=4, eval_problems=24, eval_k=2)


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[], Path]
    weight: float  # expected seconds on the development machine: only the ratios matter, for the overall ETA


def _done(folder: Path) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    try:
        verify_manifest(folder)
        return True
    except NanoR1Error:
        return False


class Speedrun:
    def __init__(self, cfg: SpeedrunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.times: dict[str, float] = {}
        self.evals: dict[str, dict] = {}

    # ------------------------------------------------------------------ stage bodies
    def final(self, name: str) -> Path:
        return self.out / name / "final"

    def pretrain(self, name: str, steps: int, **model_overrides) -> Path:
        from nanor1.config import load_config
        from nanor1.pretrain import PretrainConfig, pretrain
        c = self.cfg
        tok = str(self.out / "base" / "tokenizer") if name != "base" else ""
        cfg = load_config(PretrainConfig, overrides=[
            f"out_dir={self.out / name}", f"steps={steps}", f"task={c.task}", f"n_docs={c.pretrain_docs}",
            f"seed={c.seed}", f"device={c.device}", f"tokenizer={tok}", "ckpt_every=100", "log_every=10",
            f"stage={name}"])
        cfg.model_overrides = dict(model_overrides)
        cfg.task_options = dict(c.task_options)
        cfg.optim.lr, cfg.optim.optimizer = c.pretrain_lr, c.pretrain_optimizer
        cfg.resume = (self.out / name / "ckpt" / "latest").is_file()
        return pretrain(cfg)

    def grpo(self, name: str, start: Path, template: Template, steps: int, budget_s: float = 0.0) -> Path:
        from nanor1.grpo import GRPOConfig, grpo
        c = self.cfg
        cfg = GRPOConfig(model=str(start), out_dir=str(self.out / name), task=c.task,
                         task_options=dict(c.task_options), template=template,
                         steps=steps, prompts_per_step=c.rl_prompts, group_size=c.rl_group,
                         max_new_tokens=c.max_new_tokens, seed=c.seed, device=c.device, stage=name,
                         ckpt_every=10, sample_every=5, time_budget_s=budget_s)
        cfg.optim.lr = c.rl_lr
        cfg.resume = (self.out / name / "ckpt" / "latest").is_file()
        return grpo(cfg)

    def sft(self, name: str, start: Path, steps: int, data: str = "", n_examples: int = 1000,
            optimizer: Optimizer = Optimizer.ADAMW, lr: float = 0.0) -> Path:
        from nanor1.sft import SFTConfig, sft
        c = self.cfg
        n = sum(1 for line in open(data) if line.strip()) if data else n_examples
        cfg = SFTConfig(model=str(start), out_dir=str(self.out / name), data=data, task=c.task,
                        task_options=dict(c.task_options),
                        n_examples=n_examples, steps=steps, seed=c.seed, device=c.device, stage=name,
                        max_len=160, ckpt_every=50, batch_size=min(32, n))
        cfg.optim.optimizer, cfg.optim.lr = optimizer, lr or cfg.optim.lr
        cfg.resume = (self.out / name / "ckpt" / "latest").is_file()
        return sft(cfg)

    def rejection(self, name: str, model: Path, n_problems: int, k: int) -> Path:
        from nanor1.checkpoint import write_manifest
        from nanor1.rejection import NothingKept, RejectionConfig, rejection_sample
        c = self.cfg
        out = self.out / name / "data.jsonl"
        try:
            rejection_sample(RejectionConfig(model=str(model), out=str(out), task=c.task,
                                             task_options=dict(c.task_options), n_problems=n_problems,
                                             k=k, max_new_tokens=c.max_new_tokens, seed=c.seed, device=c.device))
        except NothingKept as e:  # name the speedrun's own settings, not the stage's
            knobs = "rs_k or rs_problems, or train longer first (cold_start_steps, rl_steps)" if name == "r1-rs" \
                else "distill_k or distill_problems, or train R1 longer first (rl_steps, rs_sft_steps)"
            raise NanoR1Error(f"{name}: {e}; in the speedrun, raise {knobs}") from None
        write_manifest(out.parent, "sft-data", config={"n_problems": n_problems, "k": k}, parent=model)
        return out.parent

    def evaluate(self, name: str, model: Path, template: Template) -> Path:
        from nanor1.evaluate import EvalConfig, evaluate
        c = self.cfg
        folder = self.out / "eval" / name
        cfg = EvalConfig(model=str(model), tasks=[c.task], task_options={c.task: dict(c.task_options)},
                         n_problems=c.eval_problems, k=c.eval_k,
                         template=template, max_new_tokens=c.max_new_tokens, seed=c.seed, device=c.device,
                         out_dir=str(folder))
        evaluate(cfg)
        from nanor1.checkpoint import write_manifest
        write_manifest(folder, "eval", config=dataclasses.asdict(cfg) | {"template": template.value}, parent=model)
        return folder

    # ------------------------------------------------------------------ the plan
    def stages(self) -> list[Stage]:
        """The 14 stages in order. Each weight is the stage's expected seconds on the development machine,
        scaled by its size (runs/sr15 with the defaults: pretraining 0.87 s/step, R1-Zero 1.66 s/step, one
        evaluation of 200 x 4 samples 10 s, ...), so the overall ETA stays right when sizes are overridden."""
        c, f = self.cfg, self.final
        Z, C = Template.R1_ZERO, Template.CHAT
        eval_w = 10.0 * c.eval_problems * c.eval_k / 800
        return [
            Stage("base", "pretrain the base model", lambda: self.pretrain("base", c.pretrain_steps),
                  0.87 * c.pretrain_steps),
            Stage("eval-base", "evaluate the base", lambda: self.evaluate("base", f("base"), Z), eval_w),
            Stage("r1zero", "R1-Zero: GRPO from the base", lambda: self.grpo("r1zero", f("base"), Z, c.rl_steps),
                  1.66 * c.rl_steps),
            Stage("eval-r1zero", "evaluate R1-Zero", lambda: self.evaluate("r1zero", f("r1zero"), Z), eval_w),
            Stage("r1-cold", "R1: cold-start SFT", lambda: self.sft("r1-cold", f("base"), c.cold_start_steps,
                                                                   n_examples=c.cold_start_examples),
                  0.24 * c.cold_start_steps),
            Stage("r1-rl", "R1: GRPO after the cold start", lambda: self.grpo("r1-rl", f("r1-cold"), C, c.rl_steps),
                  1.35 * c.rl_steps),
            Stage("r1-rs", "R1: rejection sampling", lambda: self.rejection("r1-rs", f("r1-rl"), c.rs_problems, c.rs_k),
                  7.0 * c.rs_problems * c.rs_k / 1200),
            Stage("r1", "R1: SFT on the rejection-sampled data",
                  lambda: self.sft("r1", f("r1-rl"), c.rs_sft_steps, data=str(self.out / "r1-rs" / "data.jsonl"),
                                   lr=c.rs_sft_lr),
                  0.24 * c.rs_sft_steps),
            Stage("eval-r1", "evaluate R1", lambda: self.evaluate("r1", f("r1"), C), eval_w),
            Stage("student-base", "pretrain the smaller student",
                  lambda: self.pretrain("student-base", c.student_pretrain_steps, dim=c.student_dim,
                                        n_layers=c.student_layers, n_dense_layers=c.student_layers, n_mtp_layers=0),
                  0.24 * c.student_pretrain_steps),
            Stage("distill-traces", "R1 traces for distillation",
                  lambda: self.rejection("distill-traces", f("r1"), c.distill_problems, c.distill_k),
                  0.00625 * c.distill_problems * c.distill_k),
            Stage("student-distill", "distil R1 into the student",
                  lambda: self.sft("student-distill", f("student-base"), c.distill_steps,
                                   data=str(self.out / "distill-traces" / "data.jsonl"),
                                   optimizer=c.distill_optimizer, lr=c.distill_lr), 0.068 * c.distill_steps),
            Stage("student-rl", "the student by RL alone, same compute",
                  lambda: self.grpo("student-rl", f("student-base"), Z, 10 ** 6,
                                    budget_s=max(5.0, self.times.get("student-distill", 30.0))),
                  0.068 * c.distill_steps),
            Stage("eval-students", "evaluate both students", self._eval_students, 1.2 * eval_w),
        ]

    def _eval_students(self) -> Path:
        self.evaluate("student-base", self.final("student-base"), Template.R1_ZERO)
        self.evaluate("student-distill", self.final("student-distill"), Template.CHAT)
        self.evaluate("student-rl", self.final("student-rl"), Template.R1_ZERO)
        return self.out / "eval" / "student-rl"

    def _stage_output(self, stage: Stage) -> Path:
        if stage.name.startswith("eval-"):
            return self.out / "eval" / ("student-rl" if stage.name == "eval-students" else stage.name[5:])
        if stage.name in ("r1-rs", "distill-traces"):
            return self.out / stage.name
        return self.final(stage.name)

    # ------------------------------------------------------------------ run
    def run(self) -> Path:
        tune_cpu()
        self.out.mkdir(parents=True, exist_ok=True)
        times_file = self.out / "stage_times.json"
        self.times = read_json(times_file) if times_file.is_file() else {}
        stages = self.stages()
        t0, ran_w = time.perf_counter(), 0.0  # ran_w: the weight of the stages run by this process
        for i, st in enumerate(stages, 1):
            if _done(self._stage_output(st)) and st.name in self.times:
                print(f"[{i}/{len(stages)}] {st.title}: done already, skipped", flush=True)
                continue
            elapsed, left_w = time.perf_counter() - t0, sum(s.weight for s in stages[i - 1:])
            # this machine's speed relative to the weights, measured on the stages it has run so far
            eta = f", overall ETA {elapsed / ran_w * left_w / 60:.1f} min" if ran_w and elapsed > 1 else ""
            print(f"[{i}/{len(stages)}] {st.title}{eta}", flush=True)
            ts = time.perf_counter()
            st.run()
            self.times[st.name] = round(time.perf_counter() - ts, 1)
            ran_w += st.weight
            atomic_write_json(times_file, self.times)
            said = base_reasoning_markdown(self.out, self.cfg.task) if st.name == "eval-base" else ""
            if said:  # say now, not only in the report, whether R1-Zero has anything to work with
                print("    " + said.strip(), flush=True)
        report = write_speedrun_report(self.out, self.cfg, self.times)
        print(f"report: {report}")
        return report


def speedrun(cfg: SpeedrunConfig) -> Path:
    return Speedrun(cfg).run()
