"""Seconds per GRPO step: nanor1's `grpo()` against TRL's GRPOTrainer on the same tiny Hugging Face Llama.

Both sides: chain_sum problems in the R1-Zero template, 8 prompts x G=8 = 64 completions of exactly 32 tokens per
step (EOS suppressed), temperature 1, beta=0 (no reference model), one policy update per batch, the same reward
(nanor1's accuracy + format, which a random policy never earns, plus the share of digits in the completion, so that
rewards differ within every group and both sides update on every group), bf16 autocast for training; sampling in
bf16 (ours from a bf16 copy of the policy, TRL under accelerate's autocast); transformers' eager attention on both
sides, and TRL without its default gradient checkpointing: its faster settings here. Everything is local
(HF_HUB_OFFLINE). The sides take turns, a few steps each per round, in reversed order every other round, so a busy
or drifting CPU slows each alike; --paired instead runs each side in its own process, one step each in turn.
--compile adds a third side: ours with the update and the sampling under torch.compile (GRPOConfig.compile); TRL
stays eager, as is its default. --no-replay adds ours compiled with GRPOConfig.replay_gib=0 (the update computes
its forward's matmuls again instead of taking the rollout's, nanor1/replay.py). --trl-compile adds TRL with its own
torch_compile=True as a side too (on this CPU it was slower than TRL eager, so the ratios are against TRL eager).
Run:
    python bench/grpo_bench.py [--rounds 2] [--steps 3] [--warmup 2] [--threads N] [--compile] [--no-replay]
                               [--trl-compile] [--paired]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/TRL are imported: nothing leaves the machine
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, start  # noqa: E402

PROMPTS_PER_STEP, G, NEW_TOKENS, LR = 8, 8, 32, 5e-5


def digit_share(completion: str, problem) -> float:
    """The bench's extra reward: the share of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def bench_rewards():
    from nanor1.rewards import RewardConfig
    return RewardConfig(user=[f"{Path(__file__).resolve()}:digit_share"])


def make_model(folder: Path, task) -> None:
    """A random Llama (hidden 256, 4 layers, 4 heads) with a BPE tokenizer trained on chain_sum text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from nanor1.hf_backend import save_hf_policy
    from nanor1.templates import Template, render_prompt
    from nanor1.tokenizer import train_tokenizer
    problems = task.problems("train", 3000, seed=123)
    texts = [render_prompt(p.question, Template.R1_ZERO) + f" <think> {task.worked_solution(p)} </think> "
             f"<answer> {p.answer} </answer>" for p in problems]
    tok = train_tokenizer(texts, 512, merge_across_words=True)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    # save_pretrained(safe_serialization=True) + tok.save, plus the manifest.json that grpo() needs of its parent
    save_hf_policy(folder, LlamaForCausalLM(cfg), tok, kind="bench")


class NoStop:
    """The policy's tokenizer with no EOS, so the engine generates exactly max_new_tokens (as TRL's
    min_new_tokens does on the other side)."""
    eos_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def run_ours(folder: Path, out: Path, steps: int, seed: int, rollout_dtype: str,
             side: str, on_step=None) -> tuple[list[float], list[float], list[dict]]:
    """`steps` GRPO steps of one of our sides ("ours", "ours compiled", "ours compiled, no replay"); returns the
    seconds of steps 2.. (step 1 is the warm-up), mean lengths, and the rollout / policy-update seconds of those
    steps. `on_step` is called at each step's end."""
    from nanor1.common import read_jsonl
    from nanor1.grpo import GRPOConfig, grpo
    from nanor1.policy import load_policy
    policy = load_policy(folder)
    policy.tokenizer = NoStop(policy.tokenizer)
    cfg = GRPOConfig(model=str(folder), out_dir=str(out), task="chain_sum", steps=steps,
                     prompts_per_step=PROMPTS_PER_STEP, group_size=G, max_new_tokens=NEW_TOKENS, temperature=1.0,
                     mu=1, micro_batch=PROMPTS_PER_STEP * G, device="cpu", dtype="bfloat16", seed=seed,
                     rollout_dtype=rollout_dtype, compile="compiled" in side, progress=False, ckpt_every=10 ** 6,
                     sample_every=10 ** 6, rewards=bench_rewards())
    if "no replay" in side:
        cfg.replay_gib = 0.0
    cfg.optim.lr = LR
    grpo(cfg, policy=policy, on_step=(lambda row: on_step()) if on_step else None)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "step" in r]
    ends = [r["time"] for r in rows]
    split = [{"rollout_s": r["rollout_s"], "train_s": r["train_s"], "update_frac": r["update_frac"]} for r in rows[1:]]
    if "compiled" in side:
        print(f"ours' first policy update (compiling): {rows[0]['train_s']:.1f} s")
    return [b - a for a, b in zip(ends, ends[1:])], [r["response_len"] for r in rows], split


def run_trl(folder: Path, out: Path, steps: int, seed: int, task,
            compile: bool = False, on_step=None) -> tuple[list[float], list[float], bool]:
    """The same with trl.GRPOTrainer (`compile`: its torch_compile=True); step times are taken between on_step_end
    callbacks (which also call `on_step`). Also says whether accelerate wrapped the model's forward in bf16 autocast
    (so TRL's generate() samples in bf16 too)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from nanor1.rewards import compute_rewards
    from nanor1.templates import Template, render_prompt
    problems = task.problems("train", PROMPTS_PER_STEP * (steps + 1), seed=1000 + seed)
    bos = "<|bos|>"  # TRL tokenizes text; the special-token text becomes the BOS id (checked in main)
    data = Dataset.from_dict({"prompt": [bos + render_prompt(p.question, Template.R1_ZERO) for p in problems],
                              "pid": list(range(len(problems)))})

    def reward(prompts, completions, pid, **_):
        return compute_rewards(completions, [problems[i] for i in pid], task, bench_rewards())["total"]

    ends, lengths, autocast = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            autocast.append(hasattr(kw["model"], "_original_forward"))  # accelerate's mixed-precision wrapper
            if on_step is not None:
                on_step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    args = GRPOConfig(
        output_dir=str(out), report_to="none", use_cpu=True, bf16=True, max_steps=steps, seed=seed,
        per_device_train_batch_size=PROMPTS_PER_STEP * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, torch_compile=compile,
        # TRL's default (true) recomputes the forward during the backward to save memory; off is its faster setting
        # (1.05 against 1.25 s per step here, bench/README.md, GRPO, session 18), as nanor1 never recomputes
        gradient_checkpointing=False)
    # transformers' eager attention, TRL's fastest setting on this CPU (1.20 against 1.41 s per step with the default
    # SDPA, bench/README.md, GRPO), as nanor1 loads Hugging Face policies on CPUs
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True,
                                                 attn_implementation="eager")
    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=hf_tok,
                          callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])], lengths, all(autocast)


def quiet() -> None:
    """transformers', TRL's and Python's notices off: the bench prints its own lines."""
    import logging
    import warnings

    import transformers
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-argument notices


def _paired_side(me: int, sides: list[str], folder: str, out: str, n: int, rollout_dtype: str, threads: int,
                 turn, active, cond, ready, results) -> None:
    """One side of --paired, in its own process: after every side has started up (`ready`), it takes its n steps
    one at a time when its turn comes. A step is timed from the moment the turn comes to the step's end; the last
    step keeps the turn until the run returns, and the process exits only once every side is done (`ready` again),
    so no side's teardown overlaps another's step. A side that fails breaks `ready`, so no other waits for it."""
    import threading

    side, seconds, res, error = sides[me], [], None, None

    def wait() -> float:
        with cond:
            cond.wait_for(lambda: turn.value == me)
        return time.perf_counter()

    def pass_turn(leave: bool = False) -> None:
        with cond:
            active[me] = not leave
            nxt = [(me + k) % len(sides) for k in range(1, len(sides) + 1)]
            turn.value = next((i for i in nxt if active[i]), -1)
            cond.notify_all()

    try:
        import torch
        from nanor1.common import tune_cpu
        from nanor1.tasks import get_task
        quiet()
        tune_cpu()
        if threads:
            torch.set_num_threads(threads)
        task = get_task("chain_sum")
        ready.wait()
        began = [wait()]

        def on_step():
            seconds.append(time.perf_counter() - began[0])
            if len(seconds) < n:
                pass_turn()
                began[0] = wait()
        if side.startswith("trl"):
            res = run_trl(Path(folder), Path(out), n, 0, task, side == "trl compiled", on_step)
        else:
            res = run_ours(Path(folder), Path(out), n, 0, rollout_dtype, side, on_step)
    except Exception as e:  # noqa: BLE001 (reported by the parent)
        error = f"{type(e).__name__}: {e}"
        ready.abort()
    finally:
        pass_turn(leave=True)
    results.put((side, seconds, res, error))
    try:
        ready.wait()
    except threading.BrokenBarrierError:  # a side failed; the parent reports it
        pass


def run_paired(sides: tuple[str, ...], folder: Path, d: str, n: int, args) -> dict[str, tuple]:
    """Every side in its own process (a process per side, as in a normal run: OpenMP's thread team belongs to the
    thread that starts it, and a side run from a second thread of one process measured 1.2-1.6x slower), taking one
    GRPO step each in turn, so consecutive steps of different sides see the same phase of a machine whose speed
    drifts (this one's by 20-50% within tens of seconds). Returns each side's (step seconds, run's return)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")  # a fork would inherit this process's OpenMP threads
    turn, active = ctx.Value("i", 0), ctx.Array("b", [1] * len(sides))
    cond, ready, results = ctx.Condition(), ctx.Barrier(len(sides)), ctx.Queue()
    procs = [ctx.Process(target=_paired_side, args=(i, list(sides), str(folder), str(Path(d) / f"paired{i}"), n,
                                                    args.rollout_dtype, args.threads, turn, active, cond, ready,
                                                    results)) for i in range(len(sides))]
    for p in procs:
        p.start()
    got = []
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:  # a side whose process died says nothing, and the others would wait for it forever
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise SystemExit(f"--paired: a side's process died (exit code {dead[0]})") from None
    for p in procs:
        p.join()
    # a side that failed broke the barrier of the others: name the first failure that is not that
    errors = sorted((error.startswith("BrokenBarrierError"), side, error) for side, _, _, error in got if error)
    if errors:
        raise SystemExit(f"--paired: {errors[0][1]} failed: {errors[0][2]}")
    return {side: (seconds, res) for side, seconds, res, _ in got}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="turns per side")
    p.add_argument("--steps", type=int, default=3, help="timed GRPO steps per turn")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first in each turn (its first steps page-fault their memory in)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rollout-dtype", default="bfloat16",
                   help="ours: GRPOConfig.rollout_dtype (TRL samples under accelerate's bf16 autocast)")
    p.add_argument("--compile", action="store_true",
                   help="also run ours with GRPOConfig.compile (the update and the sampling under torch.compile; "
                        "it compiles in its first, untimed steps). TRL stays eager, as its default")
    p.add_argument("--no-replay", action="store_true",
                   help="also run ours compiled with replay_gib=0 (its first update recomputes the forward)")
    p.add_argument("--trl-compile", action="store_true", help="also run TRL with its torch_compile=True")
    p.add_argument("--paired", action="store_true",
                   help="instead of turns of --steps steps, run every side at once in its own process, one step each "
                        "in turn (--rounds x --steps timed steps per side after --warmup), and also print the "
                        "median of TRL's step over ours in each such cycle")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    import torch
    from nanor1.tasks import get_task
    from nanor1.templates import Template, render_prompt
    from nanor1.tokenizer import encode_prompt, load_tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    start(0)  # threads were set above, before transformers was configured
    task = get_task("chain_sum")
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "llama"
        make_model(folder, task)
        tok = load_tokenizer(folder)
        # both sides must feed the model the same prompt ids: ours encodes BOS + text, TRL tokenizes "<|bos|>" + text
        from transformers import AutoTokenizer
        q = render_prompt(task.problems("train", 1)[0].question, Template.R1_ZERO)
        hf_ids = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)("<|bos|>" + q)["input_ids"]
        assert hf_ids == encode_prompt(tok, q), "TRL's prompt ids differ from ours"
        print(f"model: Llama 256 x 4 layers, vocab {tok.vocab_size}, prompt {len(hf_ids)} tokens; "
              f"{PROMPTS_PER_STEP} prompts x G={G}, {NEW_TOKENS} new tokens")
        sides = ("ours", "trl") + (("ours compiled",) if args.compile else ()) + \
            (("ours compiled, no replay",) if args.no_replay else ()) + (("trl compiled",) if args.trl_compile else ())
        times: dict[str, list[float]] = {side: [] for side in sides}
        lengths: dict[str, list[float]] = {side: [] for side in sides}
        split: dict[str, list[dict]] = {side: [] for side in sides if not side.startswith("trl")}
        if args.paired:
            paired = run_paired(sides, folder, d, args.warmup + args.rounds * args.steps, args)
            for side, (seconds, res) in paired.items():
                times[side], lengths[side] = seconds[args.warmup:], res[1]
                if side in split:
                    split[side] = res[2][args.warmup - 1:]  # its list starts at step 2
                print(f"{side:>13}: steps {[round(t, 2) for t in times[side]]} s", flush=True)
        for r in range(0 if args.paired else args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternating order: a drifting CPU slows each alike
                out = Path(d) / f"{side}{r}".replace(" ", "_")
                t0 = time.perf_counter()
                n, skip = args.steps + args.warmup, args.warmup - 1  # the first step has no duration already
                if side.startswith("trl"):
                    ts, ls, trl_autocast = run_trl(folder, out, n, r, task, side == "trl compiled")
                    print(f"TRL's model forward runs under bf16 autocast (sampling included): {trl_autocast}")
                else:
                    ts, ls, sp = run_ours(folder, out, n, r, args.rollout_dtype, side)
                    split[side] += sp[skip:]
                ts = ts[skip:]
                times[side] += ts
                lengths[side] += ls
                print(f"round {r + 1} {side:>13}: steps {[round(t, 2) for t in ts]} s (whole turn with loading and "
                      f"warm-up {time.perf_counter() - t0:.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mean_len = {k: statistics.mean(v) for k, v in lengths.items()}
    for k in times:
        print(f"{k:>13}: median {med[k]:.2f} s/step over {len(times[k])} steps, mean completion length "
              f"{mean_len[k]:.1f} tokens")
    for k, rows in split.items():
        print(f"{k} samples in {args.rollout_dtype}; median rollout "
              f"{statistics.median(x['rollout_s'] for x in rows):.2f} s + policy update "
              f"{statistics.median(x['train_s'] for x in rows):.2f} s per step; it ran "
              f"{statistics.mean(x['update_frac'] for x in rows):.0%} of the groups (skipping none means the same "
              "update work as TRL)")
    ours_sides = [k for k in times if not k.startswith("trl")]
    for k in ours_sides:
        print(f"{k} is {med['trl'] / med[k]:.2f}x faster than TRL per GRPO step")
        if args.paired:
            cycle = sorted(t / o for t, o in zip(times["trl"], times[k]))
            q = statistics.quantiles(cycle, n=4)
            print(f"{k}: TRL's step over ours in each cycle, median {statistics.median(cycle):.2f}x "
                  f"(quartiles {q[0]:.2f}-{q[2]:.2f}x, {sum(c >= 3 for c in cycle)} of {len(cycle)} cycles >= 3x)")
    if "trl compiled" in med:
        print(f"TRL compiled takes {med['trl compiled'] / med['trl']:.2f}x TRL eager's time per step")
    print("load average after:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "command": command(), "seconds": times,
                                               "median_s": med, "mean_length": mean_len,
                                               "speedup": {k: med["trl"] / med[k] for k in ours_sides}}, indent=2))


if __name__ == "__main__":
    main()
