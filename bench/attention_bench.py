"""Causal attention forward + backward at training shapes: nanor1's CPU path against PyTorch's SDPA.

MLA's keys are qk_nope + qk_rope wide (48 in the `speedrun` preset) while its values are v_head_dim wide (32),
so PyTorch's CPU flash kernel does not apply and SDPA runs its math path. `nanor1.model.mla` uses three batched
matmuls on CPUs instead (scale and mask fused into one baddbmm); both run here on the same tensors, under bf16
autocast as training does, taking turns after a warm-up, and their outputs and gradients are compared. Run:
    python bench/attention_bench.py [--batch 64] [--seq 128] [--reps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start, take_turns  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import torch
    from nanor1.model import ModelConfig
    from nanor1.model.mla import _causal_attention, causal_attention_cpu
    start(args.threads)
    cfg = ModelConfig.preset("speedrun")
    B, H, T = args.batch, cfg.n_heads, args.seq
    gen = torch.Generator().manual_seed(0)
    # (B, T, H, d) tensors viewed as (B, H, T, d), as MLA hands them over
    q, k = (torch.randn(B, T, H, cfg.qk_head_dim, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, T, H, cfg.v_head_dim, generator=gen, dtype=torch.bfloat16)
    grad = torch.randn(B, H, T, cfg.v_head_dim, generator=gen, dtype=torch.bfloat16)
    scale = cfg.qk_head_dim ** -0.5

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*(t.transpose(1, 2) for t in leaves), scale)
        out.backward(grad)
        return out.detach().float(), [t.grad.float() for t in leaves]

    sides = {"torch SDPA": _causal_attention, "nanor1 CPU path": causal_attention_cpu}
    results = {name: run(fn) for name, fn in sides.items()}  # warm-up, and the outputs to compare
    (o1, g1), (o2, g2) = results.values()
    err = max([float((o1 - o2).abs().max())] + [float((a - b).abs().max()) for a, b in zip(g1, g2)])
    print(f"max abs difference of outputs and gradients (bf16): {err:.4f} (output scale {float(o1.abs().max()):.2f})")
    times = take_turns({name: (lambda fn=fn: run(fn)) for name, fn in sides.items()}, args.reps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, m in med.items():
        print(f"{name:>16}: {m * 1e3:6.1f} ms per forward + backward (batch {B}, {H} heads, {T} tokens)")
    print(f"nanor1 CPU path / torch SDPA: {med['torch SDPA'] / med['nanor1 CPU path']:.2f}x faster")


if __name__ == "__main__":
    main()
