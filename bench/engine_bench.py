"""Decode throughput: nanor1's Engine against transformers' generate() on the same weights, batch 1 and 64.

A random `speedrun`-preset model is exported to the Hugging Face DeepSeek-V3 layout and loaded back with
transformers; both sides decode the same 16-token prompts greedily for exactly 128 new tokens (no EOS).
Runs are interleaved (ours, transformers, ours in bf16, ...) so a busy CPU slows every side alike. Run:
    python bench/engine_bench.py [--batches 1,64] [--new-tokens 128] [--reps 3] [--threads N]
--step-overhead VOCAB times only the engine's own work per decode step (sampling and bookkeeping), over a backend
that returns fixed logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, export_hf, machine, start  # noqa: E402


class FixedLogits:
    """A backend with no model: every prefill and decode returns the same logits, so timing `Engine.step()` over
    it measures the engine's own work per step (sampling, stop checks, bookkeeping) and nothing else."""
    continuous = True
    max_seq_len = 1 << 30

    def __init__(self, n_slots: int, vocab: int):
        import torch
        self.n_slots, self.logits = n_slots, torch.randn(n_slots, vocab, generator=torch.Generator().manual_seed(0))

    def prefill(self, prompts, slots):
        return self.logits[: len(prompts)]

    def decode(self, tokens, slots):
        return self.logits[: len(tokens)]

    def release(self, slot):
        pass


def step_overhead(batches: list[int], vocab: int, steps: int = 200, reps: int = 15) -> None:
    """Microseconds of engine work per decode step, `batches` requests sampling at temperature 1 (GRPO's case)."""
    from nanor1.engine import Engine, SamplingParams
    for B in batches:
        engine = Engine(None, None, backend=FixedLogits(B, vocab))
        for seed in range(B):
            engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=1 << 30, temperature=1.0, seed=seed))
        engine.step()  # the prefill
        per_step = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            per_step.append((time.perf_counter() - t0) / steps)
        print(f"batch {B}, vocabulary {vocab}: the engine's own work takes {statistics.median(per_step) * 1e6:.0f} us "
              f"per decode step (median of {reps} x {steps} steps)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per side and batch size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-bf16", action="store_true", help="skip ours with the model in bfloat16")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--step-overhead", type=int, metavar="VOCAB", default=0,
                   help="only time the engine's own work per decode step over a backend with no model, with this "
                        "vocabulary size (the GRPO bench's tokenizer has 472)")
    args = p.parse_args()

    import torch
    from nanor1.engine import Engine, SamplingParams
    from nanor1.model import ModelConfig, Transformer
    start(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    if args.step_overhead:
        return step_overhead(batches, args.step_overhead)
    T, N = args.prompt_len, args.new_tokens
    cfg = ModelConfig.preset("speedrun")
    if T + N > cfg.max_seq_len:
        raise SystemExit(f"prompt {T} + {N} new tokens exceed the preset's context of {cfg.max_seq_len}")
    model = Transformer(cfg).init_weights(0).eval()
    prompts = torch.randint(10, cfg.vocab_size, (max(batches), T), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        hf = export_hf(model, Path(d))
    params = SamplingParams(max_new_tokens=N, temperature=0)
    sides = {"ours fp32": Engine(model, None, max_batch=max(batches))}
    if not args.no_bf16:
        sides["ours bf16"] = Engine(copy.deepcopy(model).to(torch.bfloat16), None, max_batch=max(batches))

    def run_ours(engine, B):
        comps = engine.generate(prompts[:B].tolist(), params)
        assert all(len(c.ids) == N and c.finish_reason == "length" for c in comps), "every sequence makes N tokens"
        return [c.ids for c in comps]

    def run_hf(B):
        x = prompts[:B]
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N,
                          min_new_tokens=N, eos_token_id=None, pad_token_id=0)
        assert out.shape == (B, T + N)
        return out[:, T:].tolist()

    def timed(fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        return time.perf_counter() - t0, out

    results = []
    for B in batches:
        # warm-up, and the sanity check: greedy tokens agree with transformers on the same weights
        _, hf_ids = timed(run_hf, B)
        _, ours_ids = timed(run_ours, sides["ours fp32"], B)
        for name, engine in sides.items():
            if name != "ours fp32":
                timed(run_ours, engine, B)
        check = list(range(min(B, 2)))
        agree = [ours_ids[i] == hf_ids[i] for i in check]
        first_diff = [next((t for t, (a, b) in enumerate(zip(ours_ids[i], hf_ids[i])) if a != b), None) for i in check]
        print(f"batch {B}: greedy tokens of sequences {check} agree with transformers: {agree}"
              + ("" if all(agree) else f" (first differing position {first_diff})"))
        times: dict[str, list[float]] = {name: [] for name in [*sides, "transformers"]}
        for _ in range(args.reps):
            for name, engine in sides.items():
                times[name].append(timed(run_ours, engine, B)[0])
                if name == "ours fp32":
                    times["transformers"].append(timed(run_hf, B)[0])
        row = {"batch": B, "tokens": B * N, "agree": all(agree)}
        for name, ts in times.items():
            row[name] = {"median_s": statistics.median(ts), "tokens_per_s": B * N / statistics.median(ts),
                         "all_s": [round(t, 3) for t in ts]}
        results.append(row)
        for name in times:
            print(f"  {name:>12}: {row[name]['tokens_per_s']:9.1f} tokens/s  (median {row[name]['median_s']:.3f} s "
                  f"of {row[name]['all_s']})")
        for name in sides:
            print(f"  {name} / transformers: {row[name]['tokens_per_s'] / row['transformers']['tokens_per_s']:.2f}x")
        if "ours bf16" in sides:
            faster = "bf16" if row["ours bf16"]["tokens_per_s"] > row["ours fp32"]["tokens_per_s"] else "fp32"
            print(f"  faster dtype for our decode at batch {B}: {faster}")
    print("load average after:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "command": command(), "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
