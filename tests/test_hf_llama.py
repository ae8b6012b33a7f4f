"""nanor1.hf_llama samples from Llama-family transformers models with its own code: its cached decoding must give
transformers' logits, for each family it accepts."""

import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from nanor1.common import _can_pack_bf16, linear, pack_frozen
from nanor1.engine import ModelBackend
from nanor1.hf_llama import FastLlama, supports

VOCAB = 97


def _family(name: str, **extra):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )
    config, model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                     "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[name]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=160, initializer_range=0.1, tie_word_embeddings=False)
    if name == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model(config(**{**kw, **extra})).eval()
    for p in m.parameters():  # biases and norm weights start at 0 and 1: make them count
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return m


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


# RoPE variants: llama3 scaling comes from FastLlama's table of angles, dynamic NTK from a call per step
ROPE = {"llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=32, rope_theta=10000.0),
        "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)}


def _decode_against_transformers(model, fast: FastLlama, tol: float) -> None:
    """Prefill (prompts of different lengths, one repeated) and 70 decode steps, which grow the cache past several
    blocks, against transformers' forward over each whole sequence. Slot 1 stops after 40 steps, so the rest
    decode from slots that are not one contiguous run."""
    backend = ModelBackend(fast, n_slots=4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 2)]
    prompts.append(prompts[1])
    seqs = [list(p) for p in prompts]
    logits = [[row] for row in backend.prefill(prompts, [0, 1, 2, 3])]
    for step in range(70):
        slots = [0, 1, 2, 3] if step < 40 else [0, 2, 3]
        tokens = torch.randint(0, VOCAB, (len(slots),), generator=g)
        for b, t in zip(slots, tokens.tolist()):
            seqs[b].append(t)
        for b, row in zip(slots, backend.decode(tokens, slots)):
            logits[b].append(row)
    for b, s in enumerate(seqs):
        with torch.no_grad():
            ref = model(torch.tensor([s]).to(model.device)).logits[0, len(prompts[b]) - 1:].float()
        assert (torch.stack(logits[b]) - ref).abs().max() < tol, b


@pytest.mark.parametrize("name,rope", [(f, None) for f in FAMILIES] + [("llama", r) for r in ROPE])
def test_cached_decoding_gives_transformers_logits(name, rope):
    model = _family(name, **({"rope_parameters": ROPE[rope]} if rope else {}))
    if rope:
        assert model.model.rotary_emb.rope_type == rope
    assert supports(model, 160)
    _decode_against_transformers(model, FastLlama(model), 1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_decode_step_for_compiling_gives_transformers_logits(name):
    """FastLlama(compile=True) runs each decode step as one pure function (new keys attended apart, written after);
    here that function runs uncompiled, so this checks its arithmetic (the slow test below compiles it)."""
    model = _family(name)
    with mock.patch("nanor1.hf_llama._compiled_decode", lambda: FastLlama._decode_step):
        _decode_against_transformers(model, FastLlama(model, compile=True), 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_gives_transformers_logits(dtype):
    """The decode step under torch.compile (static, then symbolic capacity and batch), Qwen3 (grouped-query
    attention, normalised q and k heads), in float32 and in bf16 (GRPO's rollout copy; without the CPU decode
    kernel, which would run bf16 decode steps eagerly instead)."""
    model = _family("qwen3").to(dtype)
    with mock.patch("nanor1.cpu_decode.library", return_value=None):
        fast = FastLlama(model, compile=True)
        _decode_against_transformers(model, fast, 1e-4 if dtype == torch.float32 else 0.1)


def test_decoding_follows_weights_changed_in_place():
    """An optimizer step changes the parameters in place: the packed weights must be rebuilt, not reused."""
    model = _family("llama")
    backend = ModelBackend(FastLlama(model), n_slots=1)
    prompt = [3, 1, 4, 1, 5]
    before = backend.prefill([prompt], [0])
    backend.release(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    after = backend.prefill([prompt], [0])
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    assert (after[0] - ref).abs().max() < 1e-4 and (before - after).abs().max() > 1e-2


def test_frozen_weights_give_the_same_products():
    """pack_frozen + linear is F.linear, value for value, for bf16 weights (oneDNN's blocked layout where this
    build has one) and float32 ones (left as they are), with and without bias, for 2-D and 3-D inputs."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        w, b = torch.randn(48, 32, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
        packed = pack_frozen(torch.nn.Parameter(w))
        assert not packed.requires_grad and packed.is_mkldnn == (dtype == torch.bfloat16 and _can_pack_bf16())
        for shape in ((5, 32), (64, 1, 32), (3, 7, 32)):
            x = torch.randn(shape, generator=g).to(dtype)
            for bias in (None, b):
                assert torch.equal(linear(x, packed, bias), F.linear(x, w, bias)), (dtype, shape, bias is not None)
    with mock.patch("nanor1.common._can_pack_bf16", lambda: False):  # a torch build without oneDNN's packing
        w = torch.randn(48, 32, generator=g).bfloat16()
        packed = pack_frozen(w)
        assert not packed.is_mkldnn and packed.data_ptr() == w.data_ptr()


def test_bf16_sampling_with_packed_weights_is_unchanged():
    """A bf16 copy of a policy (GRPO's rollout_dtype) decodes with packed weights: the logits equal those of the
    plain weights exactly, and an in-place weight change repacks them."""
    model = _family("llama").to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 3)]
    tokens = torch.randint(0, VOCAB, (20, 2), generator=g)

    def sample(fast: FastLlama) -> torch.Tensor:
        backend = ModelBackend(fast, n_slots=2)
        out = [backend.prefill(prompts, [0, 1])] + [backend.decode(t, [0, 1]) for t in tokens]
        return torch.stack(out)

    def unpacked() -> torch.Tensor:
        with mock.patch("nanor1.hf_llama.pack_frozen", lambda w, batch=64: w.detach()):
            return sample(FastLlama(model))

    packed = FastLlama(model)
    reference = unpacked()
    assert torch.equal(sample(packed), reference)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    changed = unpacked()
    assert torch.equal(sample(packed), changed) and not torch.equal(changed, reference)


def test_only_what_it_reproduces_is_accepted():
    assert not supports(_family("llama", hidden_act="gelu"), 160)  # another MLP
    assert not supports(_family("llama", mlp_bias=True), 160)
    assert not supports(_family("mistral", sliding_window=16), 160)  # a window shorter than the context binds
    assert supports(_family("mistral", sliding_window=256), 160)  # a window longer than the context never does
    from transformers import GPT2Config, GPT2LMHeadModel
    assert not supports(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)), 160)


def _update_logits_and_grads(model, forward, dtype):
    """`forward(model, prompts, prompt_lens, inputs, attention)` on a shared-prompt batch: the logits (float32),
    the mask of those that count (position 0 and real tokens), and the gradients of the real tokens' log-probs."""
    from test_model import _shared_prompt_batch
    _, _, prompt_ids, lens, targets, real = _shared_prompt_batch(VOCAB)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = forward(model, prompt_ids, lens, targets[:, :-1], real[:, :-1])
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    (logp * real).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    counted = torch.cat((torch.ones(len(real), 1, dtype=torch.bool), real[:, :-1]), dim=1)
    return logits.detach().float(), counted, grads


def _assert_same_update(model, ours, reference, cases):
    for dtype, atol, grad_tol in cases:
        a, counted, ga = _update_logits_and_grads(model, ours, dtype)
        b, _, gb = _update_logits_and_grads(model, reference, dtype)
        assert (a - b)[counted].abs().max() < atol, dtype
        for n in gb:
            assert (ga[n] - gb[n]).abs().max() <= grad_tol * gb[n].abs().max(), (dtype, n)


@pytest.mark.parametrize("name,rope", [(f, None) for f in FAMILIES] + [("llama", r) for r in ROPE])
def test_update_forward_gives_transformers_logits_and_gradients(name, rope):
    """GRPO's update forward (each prompt once, its group's completions attending to it) against transformers'
    own shared-prompt forward: the logits of the real positions, and the gradients of their log-probs; in float32
    to 1e-5, under bf16 autocast to bf16's rounding."""
    from nanor1.hf_backend import shared_prompt_logits
    model = _family(name, **({"rope_parameters": ROPE[rope]} if rope else {})).train()
    _assert_same_update(model, lambda m, *a: FastLlama(m).continuation_logits(*a), shared_prompt_logits,
                        [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 0.05, 0.1)])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])  # qwen3 also normalises q and k
def test_compiled_update_forward_gives_eager_logits_and_gradients(name):
    """GRPOConfig.compile: the update's forward under torch.compile (where the norms are Inductor's, not the
    training RMSNorm's Function) gives eager's logits and gradients, to float32 and bf16 rounding."""
    model = _family(name).train()
    _assert_same_update(model, lambda m, *a: FastLlama(m).continuation_logits(*a, compile=True),
                        lambda m, *a: FastLlama(m).continuation_logits(*a),
                        [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 0.05, 0.1)])


def test_policy_updates_through_fastllama_unless_attention_has_dropout():
    from test_model import _shared_prompt_batch

    from nanor1.policy import Policy
    _, _, prompt_ids, lens, targets, real = _shared_prompt_batch(VOCAB)
    for dropout, used in ((0.0, True), (0.1, False)):
        policy = Policy(_family("llama", attention_dropout=dropout).train(), None, "hf", None)
        with mock.patch.object(FastLlama, "continuation_logits", autospec=True,
                               side_effect=FastLlama.continuation_logits) as fast:
            policy.continuation_logits(prompt_ids, lens, targets[:, :-1], real[:, :-1])
        assert fast.called == used


def test_training_rms_norm_is_the_formula_with_its_gradients():
    """The update's RMSNorm (its own backward): gradcheck in float64; values and gradients against autograd
    through the family's own RMSNorm in float32; the autocast dtype for its readers."""
    from nanor1.hf_llama import rms_norm_train
    g = torch.Generator().manual_seed(0)
    x64 = (3 * torch.randn(2, 5, 64, generator=g, dtype=torch.float64)).requires_grad_()
    w64 = (0.5 + torch.rand(64, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_train(a, b, 1e-6), (x64, w64))
    norm = _family("llama").model.norm
    x = x64.detach().float().requires_grad_()
    dy = torch.randn(2, 5, 64, generator=g)
    ours = rms_norm_train(x, norm.weight, norm.variance_epsilon)
    grads = torch.autograd.grad(ours, (x, norm.weight), dy)
    ref = norm(x)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), dy)
    assert ours.dtype == torch.float32 and (ours - ref).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(grads, ref_grads))
    with torch.autocast("cpu", torch.bfloat16):
        assert rms_norm_train(x, norm.weight, norm.variance_epsilon).dtype == torch.bfloat16
