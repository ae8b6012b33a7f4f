"""Training throughput and MFU: nanor1's training step against a transformers DeepseekV3 loop of the same shape.

The `speedrun` preset at batch 64 x 128 tokens, bf16 autocast, fused AdamW, gradient clipping and one optimizer step
per iteration; ours also applies the MoE bias update, as `nanor1.train.train_loop` does. transformers' DeepseekV3
has no MTP module, so ours runs twice: as configured (with its MTP loss) and with n_mtp_layers=0 (like for like);
transformers runs its eager attention on CPUs, faster there than its default SDPA. --dense adds ours with every
layer dense (no MoE). --compile adds ours under torch.compile (as `train_loop(compile=True)`; about two minutes of
compilation each on 2 cores) and transformers' model under torch.compile too (as its Trainer's torch_compile=True;
its default is eager), and prints every side against both. --expert-loop adds ours (no MTP) with its routed experts
run as a loop over experts instead of grouped matmuls. Runs are interleaved so a busy CPU slows every side alike. On
a GPU (--device cuda) every step ends with a synchronize. --matmul-share (CPUs) then profiles a few steps of each
side and prints the seconds its matmuls take per step, and the most ours could gain over each reference if
everything else in its step took no time at all. Run:
    python bench/train_bench.py [--batch 64] [--seq 128] [--reps 10] [--warmup 5] [--threads N] [--compile] [--dense]
                                [--expert-loop] [--matmul-share] [--preset speedrun] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, export_hf, machine, start  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps per side first: a process's first steps page-fault their activations in "
                        "(transformers' took ~5 steps to settle here), and compilation happens then")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--dense", action="store_true",
                   help="also time ours with a dense feed-forward in every layer (no MoE), with and without MTP")
    p.add_argument("--expert-loop", action="store_true",
                   help="also time ours (no MTP) with its routed experts as a loop instead of grouped matmuls")
    p.add_argument("--matmul-share", action="store_true",
                   help="also profile each side's step (CPU) for the time its matmuls take, and print the bound "
                        "that puts on ours against each reference")
    p.add_argument("--preset", default="speedrun", help="model preset (nanor1.model.config.PRESETS)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.matmul_share and args.device != "cpu":
        p.error("--matmul-share reads the profiler's CPU times; run it with --device cpu")

    import torch
    from nanor1.common import autocast, measure_matmul_flops, peak_flops
    from nanor1.model import ModelConfig, Transformer
    from nanor1.train import OptimConfig, flops_per_token, make_optimizer
    start(args.threads)
    dev, dtype = torch.device(args.device), torch.bfloat16
    n = 2048 if dev.type == "cpu" else 8192
    peak, measured = peak_flops(dev, dtype), measure_matmul_flops(dtype, n, device=dev)
    print(f"measured {n}x{n} matmul: bf16 {measured / 1e9:.0f} GFLOP/s, fp32 "
          f"{measure_matmul_flops(torch.float32, n, device=dev) / 1e9:.0f} GFLOP/s; MFU divides by "
          f"nanor1.common.peak_flops = {peak / 1e9:.0f} GFLOP/s (bf16; on CPUs measured the same way, on GPUs the "
          "data sheet's dense figure)")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    B, T = args.batch, args.seq
    preset = ModelConfig.preset(args.preset)
    cfg = ModelConfig.preset(args.preset, max_seq_len=max(T + 1, preset.max_seq_len))
    tokens = torch.randint(10, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(dev)
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and next-token targets
    optim = OptimConfig()

    def build(**overrides):
        return Transformer(ModelConfig.preset(args.preset, max_seq_len=cfg.max_seq_len, **overrides)).init_weights(0)

    ours = {"ours (MTP)": build(), "ours (no MTP)": build(n_mtp_layers=0)}
    if args.dense:  # what the MoE costs per step: the same preset with its MoE layers made dense
        for name, mtp in (("ours dense (MTP)", 1), ("ours dense (no MTP)", 0)):
            ours[name] = build(n_mtp_layers=mtp, n_dense_layers=cfg.n_layers)
    if args.expert_loop:
        ours["ours (no MTP, expert loop)"] = build(n_mtp_layers=0)
        for moe in ours["ours (no MTP, expert loop)"].moe_layers():
            moe.grouped = False
    with tempfile.TemporaryDirectory() as d:
        hf = export_hf(ours["ours (no MTP)"], Path(d))
    if dev.type == "cpu":  # its eager attention is faster than its default SDPA here: 0.754 against 0.800 s per step
        hf.set_attn_implementation("eager")  # (bench/README.md, Training, session 16)
    hf.to(dev).train()
    for m in ours.values():
        m.to(dev)
    opts = {name: make_optimizer(m.train(), optim) for name, m in ours.items()}
    # fused, as transformers' Trainer defaults to (optim="adamw_torch_fused" with torch >= 2.8) and as ours is
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                               weight_decay=optim.weight_decay, fused=True)

    forwards = {name: m for name, m in ours.items()}
    hf_forwards = {"transformers": hf}
    if args.compile:
        for name in [n for n in ours if "expert loop" not in n]:  # the loop's per-expert sizes break graphs
            ours[name + " compiled"], opts[name + " compiled"] = ours[name], opts[name]
            forwards[name + " compiled"] = torch.compile(ours[name])
        hf_forwards["transformers compiled"] = torch.compile(hf)  # Trainer's torch_compile=True does this

    def step_ours(name: str) -> float:
        model, opt = ours[name], opts[name]
        with autocast(dev, dtype):
            out = forwards[name](x, y)
        out.loss.backward()
        loss = out.loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias()
        return loss

    def step_hf(name: str) -> float:
        with autocast(dev, dtype):
            out = hf_forwards[name](input_ids=x, labels=x)  # transformers shifts the labels itself
        out.loss.backward()
        loss = out.loss.item()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), optim.grad_clip)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss

    runs = {name: (lambda n=name: step_ours(n)) for name in ours}
    runs.update({name: (lambda n=name: step_hf(n)) for name in hf_forwards})
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses = {}
    for name, fn in runs.items():  # warm-up (and compilation); the first losses of like models should agree
        t0 = time.perf_counter()
        losses[name] = fn()
        print(f"first step of {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.warmup - 1):
        for fn in runs.values():
            fn()
    print("first-step losses (random init, so about ln(vocab) = "
          f"{torch.log(torch.tensor(float(cfg.vocab_size))):.2f}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    for _ in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)

    results = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = B * T / med
        model = ours.get(name, ours["ours (no MTP)"])  # transformers does the no-MTP model's FLOPs
        fpt = flops_per_token(model, T)
        results[name] = {"median_s": med, "tokens_per_s": tps, "flops_per_token": fpt, "mfu": tps * fpt / peak,
                         "of_matmul": tps * fpt / measured, "all_s": [round(t, 3) for t in ts]}
        print(f"{name:>23}: {tps:7.0f} tokens/s  MFU {tps * fpt / peak:6.2%}  of matmul {tps * fpt / measured:6.2%}  "
              f"({fpt / 1e6:.1f} MFLOP/token; median {med:.3f} s/step of {results[name]['all_s']})")
    for hf_name in hf_forwards:
        for name in ours:
            print(f"{name} / {hf_name}: {results[name]['tokens_per_s'] / results[hf_name]['tokens_per_s']:.2f}x "
                  "tokens/s")
    if args.matmul_share:
        matmul_bound(runs, results, [n for n in runs if n in hf_forwards])
    print("load average after:", ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "command": command(), "results": results},
                                              indent=2))


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm")


def matmul_bound(runs: dict, results: dict, references: list[str], steps: int = 3) -> None:
    """Profile `steps` steps of each side: the seconds per step in matmul kernels (self time, so a matmul's own
    dispatch is counted once), and how fast ours could be against each reference if nothing but its matmuls took
    time. Both sides do the same matmul FLOPs (ours without MTP), so this is the ceiling no fusion can pass."""
    from torch.profiler import profile
    for name, result in results.items():
        with profile() as prof:
            for _ in range(steps):
                runs[name]()
        matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS) / steps / 1e6
        result["matmul_s"] = matmul
        print(f"{name:>23}: matmuls {matmul:.3f} s per step ({matmul / result['median_s']:.0%} of the timed median)")
    for ref in references:
        for name in results:
            if name not in references:
                print(f"{name} / {ref}: at most {results[ref]['median_s'] / results[name]['matmul_s']:.2f}x "
                      "were everything but its matmuls free")


if __name__ == "__main__":
    main()
