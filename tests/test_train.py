"""Training loop invariants: exact resume, accumulation equivalence, schedules, and clear config errors."""

import json

import numpy as np
import pytest
import torch

from nanor1.common import NanoR1Error
from nanor1.config import load_config
from nanor1.data import SFTData, encode_chat_example, stream_batch, window_starts
from nanor1.model import ModelConfig, Transformer
from nanor1.muon import Muon, orthogonalize
from nanor1.train import LoopConfig, OptimConfig, Optimizer, Schedule, lr_at, make_optimizer, train_loop

DATA = np.random.default_rng(0).integers(0, 128, size=5000).astype(np.uint16)


def _run(tmp_path, steps, resume=False, crash_at=None, grad_accum=1, batch=8, optimizer=Optimizer.ADAMW):
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0)
    torch.manual_seed(0)

    def batches(step, micro):
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt  # the run dies here; its checkpoint holds the steps before
        per = batch // grad_accum
        x, y = stream_batch(DATA, batch, 16, 0, step)
        return x[micro * per:(micro + 1) * per], y[micro * per:(micro + 1) * per]

    loop = LoopConfig(steps=steps, grad_accum=grad_accum, log_every=1, ckpt_every=3)
    optim = OptimConfig(optimizer=optimizer, lr=1e-3, warmup_steps=2)
    train_loop(model, batches, loop, optim, tmp_path, device=torch.device("cpu"), dtype=torch.float32,
               stage="test", resume=resume, show_progress=False)
    return model


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_resume_reaches_the_same_weights_and_loss(tmp_path, optimizer):
    straight = _run(tmp_path / "a", 7, optimizer=optimizer)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", 7, crash_at=4, optimizer=optimizer)
    resumed = _run(tmp_path / "b", 7, resume=True, optimizer=optimizer)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    last = lambda p: [json.loads(l) for l in p.read_text().splitlines()][-1]["loss"]
    assert last(tmp_path / "a" / "metrics.jsonl") == last(tmp_path / "b" / "metrics.jsonl")


def test_muon_steps_like_torch_on_matrices_and_per_expert_on_stacks():
    """Ours against torch.optim.Muon (match_rms_adamw scaling) on matrices; a (experts, out, in) stack steps as
    each expert's matrix would alone."""
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(16, 24, generator=g), torch.randn(40, 8, generator=g)]
    ours = [torch.nn.Parameter(m.clone()) for m in mats]
    theirs = [torch.nn.Parameter(m.clone()) for m in mats]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grads = [torch.randn(m.shape, generator=g) for m in mats]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # bf16 Newton-Schulz, fused differently
    stack = torch.randn(3, 16, 24, generator=g)
    assert torch.equal(orthogonalize(stack)[1], orthogonalize(stack[1]))
    u = orthogonalize(torch.randn(32, 32, generator=g)).float()
    s = torch.linalg.svdvals(u)
    assert 0.5 < s.min() and s.max() < 1.5  # Newton-Schulz lands every singular value near 1 (Jordan et al.)


def test_muon_takes_the_matrices_and_adamw_the_rest():
    model = Transformer(ModelConfig.preset("tiny", tie_embeddings=False))
    opt = make_optimizer(model, OptimConfig(optimizer=Optimizer.MUON))
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert "embed_tokens.weight" not in on_muon and "lm_head.weight" not in on_muon
    assert "layers.1.mlp.w_up" in on_muon and "layers.0.self_attn.o_proj.weight" in on_muon
    assert not any(n.endswith("norm.weight") for n in on_muon)
    assert len(on_muon) + sum(len(g["params"]) for g in adamw.param_groups) == len(names)


@pytest.mark.parametrize("optimizer", [Optimizer.ADAMW, Optimizer.MUON])
def test_inference_after_an_optimizer_step_uses_the_new_weights(optimizer):
    """GRPO samples from the policy between steps. Inference caches weights derived from the parameters (MLA's
    gathered projection rows, FastLlama's concatenated ones), keyed on version counters, which PyTorch's fused
    AdamW does not bump: nanor1's optimizers must, or sampling runs on stale weights (it did, in the speedrun)."""
    from nanor1.engine import ModelBackend
    from nanor1.hf_llama import FastLlama
    from test_hf_llama import _family
    cfg = OptimConfig(lr=0.05, optimizer=optimizer)
    x = torch.randint(1, 100, (2, 12))
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0)
    opt = make_optimizer(model, cfg)
    with torch.no_grad():
        before = model(x).logits  # fills the inference caches
    model(x, x).loss.backward()
    opt.step()
    with torch.no_grad():
        cached = model(x).logits
    fresh = model(x).logits.detach()  # with gradients on, nothing cached
    assert (cached - before).abs().max() > 1e-2 and (cached - fresh).abs().max() < 1e-5

    hf = _family("llama")
    opt = make_optimizer(hf, cfg)
    backend = ModelBackend(FastLlama(hf), n_slots=1)
    ids = x[:1] % hf.config.vocab_size
    backend.prefill([ids[0].tolist()], [0])
    hf(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    backend.release(0)
    with torch.no_grad():
        assert (backend.prefill([ids[0].tolist()], [0])[0] - hf(ids).logits[0, -1]).abs().max() < 1e-4


def test_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 x accumulation 1 == batch 4 x accumulation 2 (same tokens, mean losses)."""
    a = _run(tmp_path / "a", 2, grad_accum=1)
    b = _run(tmp_path / "b", 2, grad_accum=2)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=2e-5), k


def test_windows_start_at_documents_so_no_reasoning_loses_its_question():
    bos = 1
    docs = [[bos] + [5] * n for n in (3, 2, 40, 6, 9)]          # the third is longer than two windows
    data = np.array([t for d in docs for t in d], dtype=np.uint16)
    doc_starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    starts = window_starts(data, bos, seq_len=8)
    assert set(doc_starts[doc_starts <= len(data) - 9]) <= set(starts)   # every document that fits a window
    inside = sorted(set(starts) - set(doc_starts))                         # plus windows through the long one
    assert inside and all(doc_starts[2] < s < doc_starts[3] for s in inside)
    x, y = stream_batch(data, 16, 8, seed=0, step=0, starts=starts)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x.tolist():  # a window begins at a <bos>, or inside the long document (all 5s), never elsewhere
        assert row[0] == bos or set(row) == {5}


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, 100, cfg) == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)))
    wsd = OptimConfig(lr=1.0, warmup_steps=0, schedule=Schedule.WSD, decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(90, 100, wsd) == pytest.approx(0.5)


def test_sft_labels_cover_only_the_assistant_turn():
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(["3+5=8, 8+1=9", "What is 3+5+1?"] * 20, 300)
    msgs = [{"role": "user", "content": "What is 3+5+1?"},
            {"role": "assistant", "content": "<think>3+5=8, 8+1=9</think><answer>9</answer>"}]
    ids, labels = encode_chat_example(tok, msgs, 200)
    taken = [t for t in labels if t != -100]
    assert tok.decode(taken) == msgs[1]["content"]  # decode drops the trained <|eos|>
    assert taken[-1] == tok.eos_id
    assert tok.decode(ids).startswith("<|user|>What is 3+5+1?<|assistant|>")
    data = SFTData([{"messages": msgs}] * 5, tok, 200, 4, seed=0)
    x, y, real = data.batch(0)
    assert x.shape == y.shape == real.shape and (y != -100).sum() == len(taken) * x.shape[0]
    assert (real.sum(1) == len(ids) - 1).all() and real[:, : len(ids) - 1].all()  # the inputs' real tokens
    # the width rounds up to a multiple of 16 (kernel reuse on CPUs) and the padding takes no loss
    assert x.shape[1] % 16 == 0 and x.shape[1] - 16 < len(ids) - 1 <= x.shape[1]
    n = min(len(ids), x.shape[1])
    assert x[0, :n].tolist() == ids[:n] and (x[0, n:] == tok.pad_id).all() and (y[0, len(ids) - 1:] == -100).all()


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "lr must be positive"),
    ("model=huge", "unknown model preset"),
    ("batch_size=0", "batch_size must be >= 1"),
    ("data_files=[/no/such.txt]", "data file not found"),
    ("mix.facts=-0.5", "shares must be >= 0"),
    ("anneal_steps=500", "anneal_steps=500 must be between 0 and steps=500"),
])
def test_bad_pretrain_config_is_one_clear_error(tmp_path, override, message):
    from nanor1.pretrain import PretrainConfig, pretrain
    with pytest.raises(NanoR1Error, match=message):
        cfg = load_config(PretrainConfig, overrides=[f"out_dir={tmp_path}", override])
        pretrain(cfg)


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    from nanor1.pretrain import PretrainConfig, pretrain
    cfg = load_config(PretrainConfig, overrides=[f"out_dir={tmp_path}", "model=tiny", "n_docs=40", "vocab_size=300",
                                                 "seq_len=60", "batch_size=4096", "steps=1", "progress=false"])
    with pytest.raises(NanoR1Error, match="larger than the training data"):
        pretrain(cfg)


def test_pretrain_end_to_end_then_sft(tmp_path):
    from nanor1.checkpoint import verify_manifest
    from nanor1.pretrain import PretrainConfig, pretrain
    from nanor1.sft import SFTConfig, sft
    cfg = load_config(PretrainConfig, overrides=[f"out_dir={tmp_path / 'base'}", "model=tiny", "n_docs=800",
                                                 "vocab_size=300", "seq_len=48", "batch_size=8", "steps=4",
                                                 "log_every=2", "progress=false", "dtype=float32"])
    base = pretrain(cfg)
    manifest = verify_manifest(base)
    from nanor1.checkpoint import manifest_hash
    assert manifest["parent"] == manifest_hash(tmp_path / "base" / "tokenizer")  # lineage
    rows = [json.loads(l) for l in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "val_loss" in rows[-1] and rows[-1]["tokens_per_s"] > 0
    from unittest import mock
    with mock.patch("torch.compile", side_effect=lambda m: m) as compile:  # compile=true reaches train_loop
        out = sft(SFTConfig(model=str(base), out_dir=str(tmp_path / "sft"), n_examples=20, steps=2, batch_size=4,
                            max_len=60, progress=False, dtype="float32", compile=True))
    assert verify_manifest(out)["kind"] == "sft" and compile.call_count == 1


def test_annealing_draws_the_last_steps_from_the_anneal_corpus(tmp_path, monkeypatch):
    import nanor1.pretrain as pt
    seen = []  # (seed, step, which stream) for every batch drawn

    def recording(data, *args, **kwargs):
        seen.append((args[2], args[3], "anneal" if len(data) == anneal_len[0] else "main"))
        return stream_batch(data, *args, **kwargs)
    anneal_len = [None]
    real_build = pt.build_token_stream

    def build(docs, tok, cache, name):
        stream = real_build(docs, tok, cache, name)
        if name == "anneal":
            anneal_len[0] = len(stream)
            # the anneal corpus follows anneal_mix: here facts only, lines of "a+b=c"
            text = tok.decode([int(t) for t in stream[:400]])
            assert "Q:" not in text and "=" in text
        return stream
    monkeypatch.setattr(pt, "stream_batch", recording)
    monkeypatch.setattr(pt, "build_token_stream", build)
    cfg = load_config(pt.PretrainConfig, overrides=[
        f"out_dir={tmp_path}", "model=tiny", "n_docs=400", "vocab_size=300", "seq_len=48", "batch_size=4",
        "steps=5", "anneal_steps=2", "anneal_docs=300", "anneal_mix.direct=0", "anneal_mix.worked=0",
        "anneal_mix.tagged_direct=0", "anneal_mix.tagged_reasoning=0", "anneal_mix.facts=1", "progress=false",
        "dtype=float32", "eval_every=100"])
    pt.pretrain(cfg)
    assert anneal_len[0] is not None
    train_steps = {step: src for seed, step, src in seen if seed == 0}  # the validation batches use seed + 1
    assert [train_steps[s] for s in range(5)] == ["main", "main", "main", "anneal", "anneal"]


def test_every_stage_lists_its_settings_in_help_as_valid_overrides(capsys):
    """`nanor1 <stage> --help` ends with every setting and its default; each listed line is itself a valid
    override, and applying them all gives back the default config."""
    import importlib
    from nanor1.cli import main
    from nanor1.config import apply_overrides, describe, from_dict
    stages = {"pretrain": ("nanor1.pretrain", "PretrainConfig"), "sft": ("nanor1.sft", "SFTConfig"),
              "grpo": ("nanor1.grpo", "GRPOConfig"), "rejection-sample": ("nanor1.rejection", "RejectionConfig"),
              "distill": ("nanor1.distill", "DistillConfig"), "eval": ("nanor1.evaluate", "EvalConfig"),
              "speedrun": ("nanor1.speedrun", "SpeedrunConfig")}
    for command, (module, name) in stages.items():
        cls = getattr(importlib.import_module(module), name)
        lines = describe(cls())
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert all(f"  {line}\n" in shown for line in lines), command
        assert from_dict(cls, apply_overrides({}, lines)) == cls(), command
    assert "rollout_dtype=float32" in describe(getattr(importlib.import_module("nanor1.grpo"), "GRPOConfig")())
