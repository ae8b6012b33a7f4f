"""Helpers shared by the bench scripts: what machine this is, a busy-CPU warning, the command line, the
nanor1 model as a transformers one, and sides timed in turns."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path


def machine() -> str:
    import torch
    import transformers
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"load average {load}")


def warn_if_shared() -> None:
    """Other jobs on the cores make every OpenMP barrier spin-wait for a descheduled thread (we saw 100x
    slower decode steps); OMP_WAIT_POLICY=PASSIVE or --threads 1 avoids that."""
    import torch
    busy = os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5
    if torch.get_num_threads() > 1 and "OMP_WAIT_POLICY" not in os.environ and busy:
        print("warning: the CPU is busy (load average near the core count) and OpenMP threads spin-wait; rerun with "
              "OMP_WAIT_POLICY=PASSIVE or --threads 1 for meaningful numbers")


def command() -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY",) if k in os.environ)
    return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in sys.argv)


def export_hf(model, folder: Path):
    """The nanor1 model as a transformers DeepseekV3ForCausalLM (same weights, float32)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from nanor1.model.hf import to_hf_config, to_hf_state_dict
    (folder / "config.json").write_text(json.dumps(to_hf_config(model.cfg)))
    save_file(to_hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf_logging.set_verbosity_error()  # transformers has no MTP module: it lists the MTP weights as unexpected
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()


def take_turns(sides: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each side's function, over `reps` rounds in which the sides take turns, so a busy
    CPU slows every side alike. Warm each side up first."""
    import time
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def start(threads: int) -> None:
    """What every bench does first: tune the CPU runtime as nanor1's CLI does (both sides of every comparison
    run in this process, so both get it), set torch's threads, print the machine and the command, warn if
    shared."""
    import torch

    from nanor1.common import tune_cpu
    tune_cpu()
    if threads:
        torch.set_num_threads(threads)
    print("machine:", machine())
    print("command:", command())
    warn_if_shared()
