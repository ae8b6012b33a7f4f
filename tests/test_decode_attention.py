"""The decode-step attention kernel against the same attention written as torch ops in float32."""

import pytest
import torch
from test_hf_llama import _decode_against_transformers, _family

from nanor1 import decode_attention
from nanor1.decode_attention import attend
from nanor1.hf_llama import FastLlama

needs_kernel = pytest.mark.skipif(decode_attention.kernel() is None,
                                  reason="no C compiler or no AVX-512 BF16 on this CPU")


def reference(q, keys, values, k, v, positions, scale):
    """Plain softmax attention in float32 over each row's keys below its position, then its own new key."""
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        n = int(positions[b])
        K = torch.cat((keys[b, :, :n], k[b]), dim=1).float()  # (KV, n + 1, D)
        V = torch.cat((values[b, :, :n], v[b]), dim=1).float()
        p = torch.softmax(q[b].float() @ K.transpose(-1, -2) * scale, dim=-1)
        out[b] = p @ V
    return out


def case(B=5, KV=2, G=3, C=48, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache_k, cache_v = (torch.randn(B + 2, KV, C, D, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(B, KV, G, D, generator=g).bfloat16()
    k, v = (torch.randn(B, KV, 1, D, generator=g).bfloat16() for _ in range(2))
    positions = torch.randint(0, C, (B,), generator=g)
    positions[0] = 0  # a row with no cached key attends to its new key alone
    positions[-1] = C - 1
    # rows 1..B of the cache: a view with the cache's strides, as the engine passes its slots
    return q, cache_k[1:B + 1], cache_v[1:B + 1], k, v, positions, D ** -0.5


@needs_kernel
@pytest.mark.parametrize("shape", [dict(), dict(G=1, D=128, C=200), dict(B=64, KV=4, G=1, C=96), dict(D=32, G=4)])
def test_kernel_matches_float32_attention(shape):
    q, keys, values, k, v, positions, scale = case(**shape)
    out = attend(q, keys, values, k, v, positions, scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = reference(q, keys, values, k, v, positions, scale)
    # bf16 output and bf16 probabilities, as torch's bf16 attention: a few bf16 ulps of values of order 1
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    # and as close to it as the torch ops that run where the kernel does not
    fallback = attend(q.float(), keys.float(), values.float(), k.float(), v.float(), positions, scale)
    torch.testing.assert_close(fallback, expected, atol=1e-5, rtol=1e-5)


def test_without_the_kernel_the_torch_ops_run(monkeypatch):
    monkeypatch.setattr(decode_attention, "kernel", lambda: None)
    q, keys, values, k, v, positions, scale = case()
    out = attend(q, keys, values, k, v, positions, scale)
    torch.testing.assert_close(out.float(), reference(q, keys, values, k, v, positions, scale), atol=3e-2, rtol=3e-2)


@needs_kernel
def test_bf16_decoding_through_the_kernel_gives_transformers_logits(monkeypatch):
    """FastLlama's eager decode of a bf16 Llama (head_dim 32, grouped-query attention) runs its attention through
    the kernel, over slots that stop being one contiguous run, and still gives transformers' logits, to bf16's
    precision (as the compiled bf16 decode's test)."""
    calls = []
    built = decode_attention.kernel()
    monkeypatch.setattr(decode_attention, "kernel", lambda: (lambda *a: calls.append(1) or built(*a)))
    model = _family("llama", hidden_size=128).to(torch.bfloat16)
    _decode_against_transformers(model, FastLlama(model), 0.1)
    assert len(calls) == 70 * model.config.num_hidden_layers


def test_the_kernel_leaves_the_floating_point_mode_alone():
    """Linked with -ffast-math, a library turns on flush-to-zero for the whole process when it loads."""
    decode_attention.kernel()
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_a_kernel_that_cannot_be_built_is_none(monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert decode_attention.kernel.__wrapped__() is None
