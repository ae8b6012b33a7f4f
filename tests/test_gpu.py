"""The CUDA paths: the model, the engine, GRPO's shared-prompt update (and its replay of the rollout) and a pretrain ->
GRPO chain on a GPU.

Run on a machine with a GPU: `python -m pytest -m gpu`. The device is `NANOR1_TEST_DEVICE` (default `cuda`);
`NANOR1_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu.py` checks the tests themselves without one.
"""

import json
import os

import pytest
import torch

from nanor1.engine import Engine, SamplingParams
from nanor1.model import ModelConfig, Transformer

DEVICE = torch.device(os.environ.get("NANOR1_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def models():
    cpu = Transformer(ModelConfig.preset("tiny")).init_weights(0).eval()
    dev = Transformer(ModelConfig.preset("tiny")).init_weights(0).eval().to(DEVICE)
    return cpu, dev


def test_logits_on_the_device_match_the_cpu(models):
    cpu, dev = models
    idx = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(dev(idx.to(DEVICE)).logits.cpu(), cpu(idx).logits, atol=1e-4)


def test_bf16_autocast_training_step_on_the_device(models):
    _, dev = models
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0).to(DEVICE).train()
    idx = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = model(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)


def test_engine_greedy_equals_recomputation_on_the_device(models):
    _, dev = models
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [4], [5, 6, 7, 8, 9]]  # a repeat: prefill copies its cache rows
    outs = Engine(dev, None, max_batch=8).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, o in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(dev(torch.tensor([ids], device=DEVICE)).logits[0, -1].argmax()))
        assert o.ids == ids[len(p):]


def test_shared_prompt_logits_and_gradients_on_the_device():
    """GRPO's one-prompt-pass update through the device's attention (SDPA with a mask on CUDA)."""
    from test_model import check_shared_prompt_update
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0).to(DEVICE)
    check_shared_prompt_update(model, DEVICE, atol=1e-4, grad_rtol=1e-3, grad_atol=1e-5)


def test_bf16_experts_run_as_grouped_matmuls_on_the_device():
    """Training's routed experts as grouped matmuls over padded blocks on the device (F.grouped_mm), against the
    float32 loop there, values and gradients."""
    from test_model import check_grouped_experts
    check_grouped_experts(DEVICE)


def test_pretrain_then_grpo_on_the_device(tmp_path):
    from nanor1.config import load_config
    from nanor1.grpo import GRPOConfig, grpo
    from nanor1.pretrain import PretrainConfig, pretrain
    cfg = load_config(PretrainConfig, overrides=[
        f"out_dir={tmp_path / 'base'}", "model=tiny", "n_docs=800", "vocab_size=300", "seq_len=48", "batch_size=8",
        "steps=4", "log_every=2", "progress=false", f"device={DEVICE}"])
    cfg.model_overrides = {"max_seq_len": 320}
    base = pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["loss"] == rows[-1]["loss"]  # logged, and not NaN
    final = grpo(GRPOConfig(model=str(base), out_dir=str(tmp_path / "grpo"), steps=2, prompts_per_step=2,
                            group_size=4, max_new_tokens=16, micro_batch=4, progress=False, device=str(DEVICE),
                            ckpt_every=1))  # a checkpoint mid-run: the policy must stay on the device after it
    assert (final / "manifest.json").is_file() and (tmp_path / "grpo" / "ckpt").is_dir()


def test_fast_llama_decoding_on_the_device():
    """FastLlama's cached decode (nanor1.hf_llama) on the device against transformers' forward there, with
    sampling through the engine; the cache grows past a block."""
    from test_hf_llama import VOCAB, _family

    from nanor1.engine import ModelBackend
    from nanor1.hf_llama import FastLlama
    model = _family("llama").to(DEVICE)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]
    eng = Engine(None, None, backend=ModelBackend(FastLlama(model), 4), seed=0)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))
    for p, o in zip(prompts, outs):
        ids = list(p)
        with torch.no_grad():
            for _ in range(20):
                ids.append(int(model(torch.tensor([ids], device=DEVICE)).logits[0, -1].argmax()))
        assert o.ids == ids[len(p):] and max(ids) < VOCAB


def test_compiled_fast_llama_decoding_on_the_device():
    """FastLlama's compiled decode step (GRPO's compile=true) on the device against transformers' forward there:
    float32, cache growth and a batch that shrinks to slots that are not one contiguous run."""
    from test_hf_llama import _decode_against_transformers, _family

    from nanor1.hf_llama import FastLlama
    model = _family("qwen3").to(DEVICE)
    _decode_against_transformers(model, FastLlama(model, compile=True), 1e-3)


def test_replayed_update_on_the_device():
    """GRPO's first update replaying the rollout's matmul outputs (nanor1/replay.py), recorded and replayed on the
    device, against the update's own forward there: float32 and bf16 autocast."""
    from test_hf_llama import _family
    from test_replay import assert_replay_matches
    assert_replay_matches(_family("qwen2").to(DEVICE).train(), False, False,
                          [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 0.05, 0.1)])


def test_fast_llama_update_on_the_device():
    """GRPO's update through FastLlama (nanor1.hf_llama.continuation_logits: SDPA with masks on GPUs) against
    transformers' shared-prompt forward on the device: logits and gradients, float32 and bf16 autocast."""
    from test_hf_llama import _family
    from test_model import _shared_prompt_batch

    from nanor1.hf_backend import shared_prompt_logits
    from nanor1.hf_llama import FastLlama
    model = _family("llama").to(DEVICE).train()
    _, _, prompt_ids, lens, targets, real = (t.to(DEVICE) if torch.is_tensor(t) else t
                                             for t in _shared_prompt_batch(model.config.vocab_size))
    counted = torch.cat((torch.ones(len(real), 1, dtype=torch.bool, device=DEVICE), real[:, :-1]), dim=1)
    for dtype, atol, grad_tol in ((torch.float32, 1e-4, 1e-3), (torch.bfloat16, 0.05, 0.1)):
        results = []
        forwards = (lambda *a: FastLlama(model).continuation_logits(*a), lambda *a: shared_prompt_logits(model, *a))
        for forward in forwards:
            with torch.autocast(DEVICE.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = forward(prompt_ids, lens, targets[:, :-1], real[:, :-1])
            logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
            (logp * real).sum().backward()
            results.append((logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}))
            model.zero_grad(set_to_none=True)
        (a, ga), (b, gb) = results
        assert (a - b)[counted].abs().max() < atol, dtype
        assert all((ga[n] - gb[n]).abs().max() <= grad_tol * gb[n].abs().max() for n in gb), dtype
