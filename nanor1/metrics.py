"""Where training metrics go: always metrics.jsonl in the run folder; TensorBoard and Weights & Biases too
when asked for (W&B offline unless WANDB_MODE says otherwise), so runs work with no account and no network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nanor1.common import JsonlLogger, NanoR1Error


@dataclass
class TrackingConfig:
    tensorboard: bool = False  # needs `pip install tensorboard`; view with `tensorboard --logdir RUN/tb`
    wandb: bool = False  # needs `pip install wandb`; offline by default, `wandb sync` to upload later
    wandb_project: str = "nanor1"


class MetricsSink:
    def __init__(self, run_dir: str | Path, tracking: TrackingConfig | None = None, name: str = "",
                 config: dict | None = None):
        run_dir = Path(run_dir)
        self.jsonl = JsonlLogger(run_dir / "metrics.jsonl")
        self.tb = self.wb = None
        tracking = tracking or TrackingConfig()
        if tracking.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise NanoR1Error("tracking.tensorboard=true needs the tensorboard package: pip install tensorboard") \
                    from None
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if tracking.wandb:
            try:
                import wandb
            except ImportError:
                raise NanoR1Error("tracking.wandb=true needs the wandb package: pip install wandb") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wb = wandb.init(project=tracking.wandb_project, name=name or run_dir.name, dir=str(run_dir),
                                 config=config or {}, reinit=True)

    def log(self, **row) -> None:
        self.jsonl.log(**row)
        step = int(row.get("step", 0))
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
