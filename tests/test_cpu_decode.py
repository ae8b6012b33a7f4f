"""The CPU decode kernels against their torch ops (attention in float32), and inside FastLlama's decode."""

from unittest import mock

import pytest
import torch
from test_hf_llama import VOCAB, _decode_against_transformers, _family

from nanor1 import cpu_decode
from nanor1.common import _can_pack_bf16
from nanor1.engine import ModelBackend
from nanor1.hf_llama import FastLlama, _rope

needs_kernel = pytest.mark.skipif(cpu_decode.library() is None,
                                  reason="no C compiler or no AVX-512 BF16 on this CPU")


def reference(q, cache_k, cache_v, rows, source, shared, positions, scale):
    """Plain softmax attention in float32 over each row's keys up to its position, the shared ones from its
    source slot."""
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        n, r, s, p = int(positions[b]) + 1, int(rows[b]), int(source[b]), min(int(shared[b]), int(positions[b]) + 1)
        keys = torch.cat((cache_k[s, :, :p], cache_k[r, :, p:n]), dim=1).float()
        values = torch.cat((cache_v[s, :, :p], cache_v[r, :, p:n]), dim=1).float()
        out[b] = torch.softmax(q[b].float() @ keys.transpose(-1, -2) * scale, dim=-1) @ values
    return out


@needs_kernel
@pytest.mark.parametrize("B,KV,G,C,D", [(5, 2, 3, 48, 64), (5, 2, 1, 200, 128), (64, 4, 1, 96, 64), (5, 2, 4, 48, 32)])
def test_kernel_matches_float32_attention(B, KV, G, C, D):
    g = torch.Generator().manual_seed(0)
    n_slots = B + 3
    cache_k, cache_v = (torch.randn(n_slots, KV, C, D, generator=g).bfloat16() for _ in range(2))
    qkv = torch.randn(B, KV * G + 2 * KV, D, generator=g).bfloat16()
    angles = torch.rand(B, 1, 1, D // 2, generator=g) * 6
    cos, sin = (f(torch.cat((angles, angles), dim=-1)).bfloat16() for f in (torch.cos, torch.sin))
    slots = torch.randperm(n_slots, generator=g)
    rows = slots[:B]  # slots in any order, not all of them
    positions = torch.randint(0, C, (B,), generator=g)
    positions[0], positions[-1] = 0, C - 1  # a first token attends to itself alone; a full row
    # rows 1 and 2 read a prompt from a slot that none of them writes into (a source writes past its prompt):
    # one shorter than their position, and one past it
    source, shared = rows.clone(), torch.zeros(B, dtype=torch.long)
    source[1], shared[1] = slots[B], int(positions[1]) // 2
    source[2], shared[2] = slots[B + 1], C
    assert cpu_decode.supports(cache_k.device, cache_k.dtype, D)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    out = cpu_decode.attend(qkv, cos, sin, cache_k, cache_v, rows, source, shared, positions, D ** -0.5, KV)
    assert out.dtype == torch.bfloat16 and out.shape == (B, KV, G, D)
    # the rotated new keys (FastLlama's ops, bit for bit) and the values are written at each row's position,
    # and nothing else is
    q, k, v = qkv[:, None].split((KV * G, KV, KV), dim=2)  # (B, 1, heads, D)
    q, k = (_rope(t.transpose(1, 2), cos, sin) for t in (q, k))  # (B, heads, 1, D)
    expected_k[rows, :, positions], expected_v[rows, :, positions] = k[:, :, 0], v[:, 0]
    assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)
    expected = reference(q.reshape(B, KV, G, D), cache_k, cache_v, rows, source, shared, positions, D ** -0.5)
    # bf16 output and bf16 probabilities, as torch's bf16 attention: a few bf16 ulps of values of order 1
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@needs_kernel
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_bf16_decoding_through_the_kernels_gives_transformers_logits(name, monkeypatch):
    """FastLlama's eager decode of a bf16 Llama (head_dim 32, grouped-query attention) or Qwen3 (head_dim 128,
    normalised q and k heads) runs through the kernels, also over slots that stop being one contiguous run and a
    repeated prompt, and still gives transformers' logits to bf16's precision (as the compiled bf16 decode's
    test)."""
    calls = []
    built = cpu_decode.library()

    class Counting:
        def __getattr__(self, name):
            return lambda *a: calls.append(name) or getattr(built, name)(*a)

    monkeypatch.setattr(cpu_decode, "library", lambda: Counting())
    model = _family(name, hidden_size=128).to(torch.bfloat16)
    _decode_against_transformers(model, FastLlama(model), 0.1)
    n = model.config.num_hidden_layers
    assert calls.count("decode_attention") == 70 * n and calls.count("silu_mul") == 70 * n
    assert calls.count("add_rms_norm") == 70 * (2 * n + 1)


@needs_kernel
def test_norm_and_swiglu_kernels_round_as_the_ops():
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(6, 1, 96, generator=g).bfloat16() * 3 for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=g)).bfloat16()
    summed = x + y
    xf = summed.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = cpu_decode.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(x, summed)  # in place
    torch.testing.assert_close(out, expected, atol=0, rtol=2 ** -7)  # at most one bf16 rounding apart
    assert (out != expected).float().mean() < 0.02
    gate_up = torch.randn(6, 1, 2 * 80, generator=g).bfloat16() * 3
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_decode.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               atol=0, rtol=2 ** -7)


@needs_kernel
def test_released_slots_of_a_shared_prompt_take_new_prompts():
    """Slots 2 and 3 repeat slot 0's prompt and read it from slot 0. Slot 3 (a reader) finishes first and takes a
    prompt of its own, which it must read from itself; then slot 0 (the source) finishes and takes another, and
    slot 2 must keep its prompt (a copy, made at the release). Every row must still give transformers' logits for
    its own sequence."""
    model = _family("llama", hidden_size=128).to(torch.bfloat16)
    backend = ModelBackend(FastLlama(model), n_slots=4)
    cache = backend.cache
    g = torch.Generator().manual_seed(3)
    a, b, c, d = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 4, 11, 5))
    seqs, logits = [list(a), list(b), list(a), list(a)], [[], [], [], []]

    def restart(slot, prompt):
        seqs[slot], logits[slot] = list(prompt), [backend.prefill([prompt], [slot])[0]]

    def step(n):
        for _ in range(n):
            tokens = torch.randint(0, VOCAB, (4,), generator=g)
            for slot, t, row in zip(range(4), tokens.tolist(), backend.decode(tokens, [0, 1, 2, 3])):
                logits[slot].append(row)
                seqs[slot].append(t)

    for slot, row in zip(range(4), backend.prefill(seqs, [0, 1, 2, 3])):
        logits[slot].append(row)
    assert cache.share_prompts and cache.source == [0, 1, 0, 0] and cache.shared == [0, 0, 7, 7]
    step(5)
    backend.release(3)
    assert cache.source == [0, 1, 0, 3] and cache.shared == [0, 0, 7, 0]
    restart(3, d)
    step(3)
    backend.release(0)
    assert cache.source == [0, 1, 2, 3] and cache.shared == [0, 0, 0, 0]
    restart(0, c)
    step(6)
    for slot in range(4):
        prompt = {0: c, 1: b, 2: a, 3: d}[slot]
        with torch.no_grad():
            ref = model(torch.tensor([seqs[slot]])).logits[0, len(prompt) - 1:].float()
        assert (torch.stack(logits[slot]) - ref).abs().max() < 0.1, slot


@needs_kernel
def test_compile_true_decodes_through_the_kernel_where_it_runs():
    """The eager step with the kernel is faster than the compiled one (bench/README.md, GRPO), so a bf16
    FastLlama(compile=True) on such a CPU never calls the compiled step, and keeps oneDNN's packed weights."""
    model = _family("llama", hidden_size=128).to(torch.bfloat16)
    fast = FastLlama(model, compile=True)
    with mock.patch("nanor1.hf_llama._compiled_decode", side_effect=AssertionError("compiled step called")):
        _decode_against_transformers(model, fast, 0.1)
    assert fast.layers()[0].qkv.is_mkldnn or not _can_pack_bf16()


def test_where_the_kernels_do_not_run_the_ops_do(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cpu_decode, "library", lambda: None)  # as on a CPU without AVX-512 BF16
    assert not cpu_decode.supports(cpu, torch.bfloat16, 64)
    monkeypatch.setattr(cpu_decode, "library", lambda: object())
    assert cpu_decode.supports(cpu, torch.bfloat16, 64)
    assert not cpu_decode.supports(cpu, torch.float32, 64)
    assert not cpu_decode.supports(cpu, torch.bfloat16, 48)  # head_dim not a multiple of 32
    model = _family("llama", hidden_size=128)  # float32: a cache of whole rows, the ops' decode
    assert not FastLlama(model).new_cache(2).share_prompts


def test_the_kernel_leaves_the_floating_point_mode_alone():
    """Linked with -ffast-math, a library turns on flush-to-zero for the whole process when it loads."""
    cpu_decode.library()
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_a_kernel_that_cannot_be_built_is_none(monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert cpu_decode.library.__wrapped__() is None
