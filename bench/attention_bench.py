"""Causal attention forward + backward at training shapes: nanor1's CPU path against PyTorch's SDPA.

MLA's keys are qk_nope + qk_rope wide (48 in the `speedrun` preset) while its values are v_head_dim wide (32),
so PyTorch's CPU flash kernel does not apply and SDPA runs its math path. `nanor1.model.mla` uses three batched
matmuls on CPUs instead (scale and mask fused into one baddbmm); both run here on the same tensors, under bf16
autocast as training does, taking turns after a warm-up, and their outputs and gradients are compared. nanor1's
path runs twice: in one block of queries, and in the query blocks `causal_block` picks (each block against the keys
up to its end: from 256 positions on, halves in eager code and 64 rows under torch.compile). --compile runs every side
under torch.compile, as `train_loop(compile=True)` does. Run:
    python bench/attention_bench.py [--batch 64] [--seq 128] [--reps 20] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import unittest.mock
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start, take_turns  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="every side under torch.compile")
    args = p.parse_args()

    import torch
    from nanor1.model import ModelConfig
    from nanor1.model.mla import _causal_attention, causal_attention_cpu, causal_block
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

    sides = {"torch SDPA": _causal_attention,
             "nanor1, one block": lambda q, k, v, scale: causal_attention_cpu(q, k, v, scale, block=0),
             "nanor1, blocks": causal_attention_cpu}
    if args.compile:
        sides = {name: torch.compile(fn) for name, fn in sides.items()}
    results = {name: run(fn) for name, fn in sides.items()}  # warm-up (and compilation), the outputs to compare
    o1, g1 = results["torch SDPA"]
    for name, (o2, g2) in list(results.items())[1:]:
        err = max([float((o1 - o2).abs().max())] + [float((a - b).abs().max()) for a, b in zip(g1, g2)])
        print(f"{name} against SDPA, max abs difference of outputs and gradients (bf16): {err:.4f} "
              f"(output scale {float(o1.abs().max()):.2f})")
    times = take_turns({name: (lambda fn=fn: run(fn)) for name, fn in sides.items()}, args.reps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    with unittest.mock.patch("torch.compiler.is_compiling", return_value=args.compile):  # the blocks its sides used
        block = causal_block(T)
    print(f"{'compiled' if args.compile else 'eager'}; blocks of {block or T} query rows")
    for name, m in med.items():
        print(f"{name:>18}: {m * 1e3:6.1f} ms per forward + backward (batch {B}, {H} heads, {T} tokens)")
    for name in list(sides)[1:]:
        print(f"{name} / torch SDPA: {med['torch SDPA'] / med[name]:.2f}x faster")
    print(f"blocks / one block: {med['nanor1, one block'] / med['nanor1, blocks']:.2f}x faster")


if __name__ == "__main__":
    main()
