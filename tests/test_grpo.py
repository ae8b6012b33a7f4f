"""The GRPO loop, rejection sampling and distillation on a tiny model: they run, log, resume and fail clearly."""

import json

import pytest
import torch

from nanor1.checkpoint import save_checkpoint, verify_manifest
from nanor1.common import NanoR1Error
from nanor1.grpo import GRPOConfig, build_batch, grpo, update_chunks
from nanor1.engine import Completion
from nanor1.model import ModelConfig, Transformer
from nanor1.policy import load_policy


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model with a real tokenizer, saved as a checkpoint (random weights: rewards will be ~0)."""
    from nanor1.corpus import pretrain_documents
    from nanor1.tasks import get_task
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(pretrain_documents(get_task("chain_sum"), 300, 0), 300, merge_across_words=True)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=320)).init_weights(0)
    return save_checkpoint(tmp_path_factory.mktemp("base") / "final", model, tokenizer=tok)


def _cfg(base, out, **kw):
    args = dict(model=str(base), out_dir=str(out), steps=3, prompts_per_step=2, group_size=4, max_new_tokens=16,
                micro_batch=4, ckpt_every=2, progress=False, dtype="float32")
    return GRPOConfig(**{**args, **kw})


def test_grpo_runs_logs_and_saves(base, tmp_path):
    seen = []  # on_step gets each step's row as logged (bench/grpo_bench.py times steps with it)
    final = grpo(_cfg(base, tmp_path), on_step=seen.append)
    assert verify_manifest(final)["kind"] == "grpo"
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in seen] == [1, 2, 3] and seen[-1]["reward_mean"] == rows[-1]["reward_mean"]
    for key in ("reward_mean", "reward/accuracy", "reward/format", "reward_std/accuracy", "reward_std/format",
                "accuracy", "response_len", "clip_frac", "entropy", "zero_std_frac", "rollout_tokens_per_s",
                "train_tokens_per_s"):
        assert key in rows[-1], key
    assert (tmp_path / "samples.jsonl").read_text().strip()
    # every reward is 0 (a random policy), yet the update ran every group: this MoE policy's balancing bias counts
    # the experts of every token (test_skipping_zero_advantage_groups_leaves_the_update_unchanged turns it off)
    assert all(r["zero_std_frac"] == 1.0 and r["update_frac"] == 1.0 for r in rows)


def test_grpo_time_budget_stops_the_run_and_its_bar_counts_the_steps_it_allows(base, tmp_path, capsys):
    """time_budget_s (the speedrun's student RL gets distillation's wall clock): the run stops once the budget is
    spent, however many steps were asked for, and the progress bar's total (hence its ETA) is the number of steps
    the remaining time allows, not the million asked for."""
    import re
    grpo(_cfg(base, tmp_path, steps=10 ** 6, time_budget_s=2.0, progress=True, ckpt_every=10 ** 6))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 1000
    bars = [(int(n), int(t)) for n, t in re.findall(r"(\d+)/(\d+) \[", capsys.readouterr().err)]
    assert bars and all(t < 1000 for _, t in bars), bars[-3:]
    assert bars[-1][0] == len(rows)


def test_grpo_samples_from_a_bf16_copy_kept_in_step(base, tmp_path):
    """rollout_dtype=bfloat16: the engine samples from a bf16 copy that takes the policy's weights each step."""
    from nanor1.grpo import _sampler, _sync
    from nanor1.policy import load_policy
    policy = load_policy(base)
    assert _sampler(policy, torch.float32) is policy
    sampler = _sampler(policy, torch.bfloat16)
    assert next(sampler.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(-1.0)
    _sync(sampler.model, policy.model)
    for a, b in zip(sampler.model.parameters(), policy.model.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))
    grpo(_cfg(base, tmp_path, rollout_dtype="bfloat16"))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["response_len"] > 0 for r in rows)
    with pytest.raises(NanoR1Error, match="unknown dtype"):
        grpo(_cfg(base, tmp_path / "bad", rollout_dtype="bf8"))
    with pytest.raises(NanoR1Error, match="replay_gib must be >= 0"):
        grpo(_cfg(base, tmp_path / "bad", replay_gib=-1.0))


def test_grpo_compile_is_refused_for_a_nanor1_policy(base, tmp_path):
    """compile=true on a nanor1 policy is one clear line (its compiled update's gradients were wrong in bf16;
    tests/test_model.py keeps the check, as an expected failure); the Llama-family case is in test_hf_backend."""
    with pytest.raises(NanoR1Error, match="compile=true is not available for nanor1 policies"):
        grpo(_cfg(base, tmp_path, compile=True))
    with pytest.raises(NanoR1Error, match="compiled sampling is for Llama-family policies"):
        load_policy(base).engine(compile=True)


def test_grpo_logs_each_reward_functions_mean_and_std(base, tmp_path):
    """A user reward that alternates 0, 1, 0, 1, ... over each step's 8 completions: mean 0.5, sample std
    sqrt(8 * 0.25 / 7)."""
    reward_file = tmp_path / "alternating_reward.py"
    reward_file.write_text("calls = [0]\n\ndef alternate(completion, problem):\n"
                           "    calls[0] += 1\n    return float(calls[0] % 2)\n")
    spec = f"{reward_file}:alternate"
    cfg = _cfg(base, tmp_path / "run", mu=2)  # two updates per batch: old log-probs recomputed, then the ratio moves
    cfg.loss.beta = 0.01  # and a frozen reference to measure the KL against
    cfg.rewards.user = [spec]
    grpo(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kl"] > 0  # the policy moved away from its frozen reference
    for r in rows:
        assert r[f"reward/{spec}"] == pytest.approx(0.5)
        assert r[f"reward_std/{spec}"] == pytest.approx((8 * 0.25 / 7) ** 0.5)
        assert r["reward_std/format"] >= 0


def test_update_chunks_skip_groups_that_cannot_move_the_loss():
    """Whole groups per micro-batch; skipped: a group whose advantages are all zero, and one with no token under
    the mask (here the second and the fourth of four groups of 2)."""
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5, 1.0, -1.0])
    mask = torch.ones(8, 3, dtype=torch.bool)
    mask[6:] = False
    kept = update_chunks(adv, mask, 2, 2, skip_silent=True)
    assert [(ps.tolist(), sl.tolist()) for ps, sl in kept] == [([0, 2], [0, 1, 4, 5])]
    every = update_chunks(adv, mask, 2, 3, skip_silent=False)
    assert [(ps.tolist(), sl.tolist()) for ps, sl in every] == [([0, 1, 2], [0, 1, 2, 3, 4, 5]), ([3], [6, 7])]
    assert update_chunks(torch.zeros(8), mask, 2, 2, skip_silent=True) == []


@pytest.mark.parametrize("micro_batch", [4, 8])
def test_skipping_zero_advantage_groups_leaves_the_update_unchanged(tmp_path, micro_batch):
    """A user reward that gives the first group of each step equal rewards and the second different ones, and
    every completion of the third step the same reward: skipping those groups (the default) ends with the weights,
    losses and clip fractions of the run that updates on every group, AdamW's momentum step on a zero gradient
    included. micro_batch=8 puts both groups in one micro-batch when nothing is skipped, so the skipping run's
    forwards differ in shape (float32 rounding). The model's MoE balancing bias is off here: it follows the loads
    of the tokens the update ran, which skipping changes."""
    from nanor1.corpus import pretrain_documents
    from nanor1.tasks import get_task
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(pretrain_documents(get_task("chain_sum"), 300, 0), 300, merge_across_words=True)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=320,
                                           bias_update_speed=0.0)).init_weights(0)
    start = save_checkpoint(tmp_path / "base", model, tokenizer=tok)
    reward_file = tmp_path / "patterned_reward.py"
    reward_file.write_text("calls = [0]\n\ndef pattern(completion, problem):\n"
                           "    calls[0] += 1\n    i = (calls[0] - 1) % 24\n"
                           "    return 0.0 if i >= 16 or i % 8 < 4 else float(i % 2)\n")
    runs = {}
    for skip in (True, False):
        cfg = _cfg(start, tmp_path / f"skip{skip}", micro_batch=micro_batch, skip_zero_advantage=skip, mu=2)
        cfg.rewards.user = [f"{reward_file}:pattern"]
        runs[skip] = grpo(cfg), [json.loads(l) for l in (tmp_path / f"skip{skip}" / "metrics.jsonl").read_text()
                                 .splitlines()]
    (final_a, rows_a), (final_b, rows_b) = runs[True], runs[False]
    assert [r["update_frac"] for r in rows_a] == [0.5, 0.5, 0.0] and [r["update_frac"] for r in rows_b] == [1.0] * 3
    assert [r["zero_std_frac"] for r in rows_a] == [0.5, 0.5, 1.0]
    for a, b in zip(rows_a, rows_b):
        for key in ("loss", "clip_frac", "grad_norm", "reward_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["entropy"] > 0
    from nanor1.checkpoint import load_model
    sa, sb = load_model(final_a).state_dict(), load_model(final_b).state_dict()
    assert any(not torch.equal(sa[k], model.state_dict()[k]) for k in sa)  # the mixed steps moved the weights
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grpo_resume_after_checkpoint(base, tmp_path):
    """A run stopped after its step-1 checkpoint and resumed ends with the uninterrupted run's weights."""
    straight = grpo(_cfg(base, tmp_path / "a", steps=4))
    grpo(_cfg(base, tmp_path / "b", steps=2, ckpt_every=1))  # leaves ckpt/step_0000001
    cfg = _cfg(base, tmp_path / "c", steps=4)
    # the interrupted run: b's step-1 checkpoint; resuming restarts the loop at step 2 with the saved state
    import shutil
    shutil.copytree(tmp_path / "b" / "ckpt", tmp_path / "c" / "ckpt")
    (tmp_path / "c" / "ckpt" / "latest").write_text("step_0000001\n")
    cfg.resume = True
    resumed = grpo(cfg)
    rows = [json.loads(l) for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]
    from nanor1.checkpoint import load_model
    sa, sb = load_model(straight).state_dict(), load_model(resumed).state_dict()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-6), k


def test_build_batch_masks_completion_and_stop_token():
    comps = [Completion([1, 2], [5, 6], "", "stop", [0.0, 0.0], stop_token_id=2),
             Completion([1, 2], [7], "", "length", [0.0])]
    prompts, lens, y, mask, real = build_batch([[1, 2], [1, 2, 3]], comps, pad_id=0, overlong_filter=True)
    assert prompts.tolist() == [[1, 2, 0], [1, 2, 3]] and lens.tolist() == [2, 3]
    assert y[0].tolist() == [5, 6, 2] and mask[0].tolist() == [True, True, True]
    assert mask[1].tolist() == [False, False, False]  # truncated: filtered out
    assert real[1].tolist() == [True, False, False] and y[1].tolist() == [7, 0, 0]  # then padding
    padded = build_batch([[1, 2], [1, 2, 3]], comps, pad_id=0, overlong_filter=True, multiple=16)
    assert [t.shape[1] for t in (padded[0], padded[2], padded[3], padded[4])] == [16] * 4  # widths round up
    assert padded[4].sum() == real.sum() and padded[2][0, :3].tolist() == [5, 6, 2] and padded[1].tolist() == [2, 3]


def test_padded_widths_leave_the_log_probs_unchanged(base):
    """The update pads prompt and completion widths to SHAPE_MULTIPLE (kernel reuse on CPUs); the padding is
    masked, so every real token's log-prob is what the exact widths give."""
    from nanor1.grpo import Rollouts, _logp
    from nanor1.policy import load_policy
    policy = load_policy(base)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 9)]
    comps = [Completion(prompts[i // 2], torch.randint(3, 200, (n,), generator=g).tolist(), "", "length", [])
             for i, n in enumerate((4, 7, 2, 6))]
    out = {}
    for multiple in (1, 16):
        ro = Rollouts(*build_batch(prompts, comps, 0, False, multiple), {}, comps)
        logp, _ = _logp(policy, ro, slice(0, 2), slice(0, 4), 1.0, torch.device("cpu"), torch.float32, False)
        out[multiple] = logp[ro.real[:, : logp.shape[1]]]
    torch.testing.assert_close(out[16], out[1], rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_context_is_clear(base, tmp_path):
    with pytest.raises(NanoR1Error, match="exceeds the model's context"):
        grpo(_cfg(base, tmp_path, max_new_tokens=200))


def test_raising_user_reward_is_clear(base, tmp_path):
    reward_file = tmp_path / "myreward.py"
    reward_file.write_text("def bad(completion, problem):\n    raise ValueError('boom')\n")
    cfg = _cfg(base, tmp_path / "run")
    cfg.rewards.user = [f"{reward_file}:bad"]
    with pytest.raises(NanoR1Error, match="bad"):
        grpo(cfg)


def test_empty_dataset_is_clear(base, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NanoR1Error, match="empty"):
        grpo(_cfg(base, tmp_path / "run", task=str(empty)))


def test_rejection_sampling_and_distill(base, tmp_path):
    from nanor1.distill import DistillConfig, distill
    from nanor1.rejection import RejectionConfig, keep_completion, rejection_sample, repeated_share
    from nanor1.tasks import get_task
    task = get_task("chain_sum")
    p = task.problems("train", 1, 0)[0]
    good = f"<think>steps</think><answer>{p.answer}</answer>"
    cfg = RejectionConfig(model=str(base))
    assert keep_completion(good, p, task, cfg) is None
    assert keep_completion(f"<answer>{p.answer}</answer>", p, task, cfg) == "format"
    assert keep_completion("<think>x</think><answer>-1</answer>", p, task, cfg) == "wrong"
    assert repeated_share("a, a, a, a, b") == 0.8
    # a random model keeps nothing: that is a clear error, not an empty file passed on silently
    with pytest.raises(NanoR1Error, match="kept nothing"):
        rejection_sample(RejectionConfig(model=str(base), out=str(tmp_path / "rs.jsonl"), n_problems=2, k=2,
                                         max_new_tokens=8))
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q.question},
                                                       {"role": "assistant", "content": f"<think>ok</think>"
                                                                                        f"<answer>{q.answer}</answer>"}]})
                              + "\n" for q in task.problems("train", 8, 1)))
    cfg = DistillConfig(traces=str(traces), student=str(base), out_dir=str(tmp_path / "student"))
    cfg.training.steps, cfg.training.batch_size, cfg.training.progress, cfg.training.dtype = 2, 4, False, "float32"
    assert verify_manifest(distill(cfg))["kind"] == "distill"
