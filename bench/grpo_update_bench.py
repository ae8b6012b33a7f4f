"""GRPO's update, forward + backward: whole prompt + completion rows against one prompt pass per group.

A group's G completions share their prompt, so `Transformer.forward_shared_prompts` runs each prompt once and
lets the completions attend to it. Both run here on a random `speedrun`-preset model, on the same random
prompts and completions (16 prompts x G = 8, two micro-batches of 64 rows as `nanor1.grpo` takes them), under
bf16 autocast in train mode, taking turns after a warm-up; the completions' log-probs are compared. Run:
    python bench/grpo_update_bench.py [--prompt-len 49] [--completion-len 40] [--reps 5] [--threads N]
(49 tokens is a chain_sum prompt in the R1-Zero template, 14 in the chat template.)
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
    p.add_argument("--prompt-len", type=int, default=49)
    p.add_argument("--completion-len", type=int, default=40, help="the longest completion; lengths vary below it")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import torch
    from nanor1.common import autocast
    from nanor1.model import ModelConfig, Transformer
    from nanor1.rl import gather_logprobs
    start(args.threads)

    n, G, P, C = 16, 8, args.prompt_len, args.completion_len
    model = Transformer(ModelConfig.preset("speedrun")).init_weights(0).train()
    g = torch.Generator().manual_seed(0)
    V = model.cfg.vocab_size
    prompts = torch.randint(1, V, (n, P), generator=g)
    lens = torch.randint(C // 3, C + 1, (n * G,), generator=g)
    comps = torch.randint(1, V, (n * G, C), generator=g)
    real = torch.arange(C)[None, :] < lens[:, None]
    comps[~real] = 0
    cpu = torch.device("cpu")

    def whole_rows(rows: slice) -> torch.Tensor:
        x = torch.cat((prompts.repeat_interleave(G, 0)[rows], comps[rows]), dim=1)
        with autocast(cpu, torch.bfloat16):
            logits = model(x[:, :-1]).logits[:, P - 1:]
        return gather_logprobs(logits, comps[rows])

    def shared(rows: slice) -> torch.Tensor:
        ps = slice(rows.start // G, rows.stop // G)
        with autocast(cpu, torch.bfloat16):
            logits = model.forward_shared_prompts(prompts[ps], torch.full((ps.stop - ps.start,), P), comps[rows, :-1])
        return gather_logprobs(logits, comps[rows])

    def step(score) -> None:
        for c in range(2):
            rows = slice(c * 64, (c + 1) * 64)
            (score(rows) * real[rows]).sum().backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        diff = float(((whole_rows(slice(0, 64)) - shared(slice(0, 64))).abs() * real[:64]).max())
    print(f"{n} prompts of {P} tokens x G={G}, completions of {C // 3}-{C} tokens (mean {lens.float().mean():.1f}); "
          f"max |log-prob difference| {diff:.4f} (bf16)")
    sides = {"whole rows": lambda: step(whole_rows), "one prompt pass per group": lambda: step(shared)}
    for warm_up in sides.values():
        warm_up()
    times = take_turns(sides, args.reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>26}: {v:.3f} s per update (median of {args.reps})")
    print(f"one prompt pass per group is {med['whole rows'] / med['one prompt pass per group']:.2f}x faster")


if __name__ == "__main__":
    main()
