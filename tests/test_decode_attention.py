"""The decode-step attention kernel against attention written out in float32, and inside FastLlama's decode."""

import pytest
import torch
from test_hf_llama import _decode_against_transformers, _family

from nanor1 import decode_attention
from nanor1.hf_llama import FastLlama

needs_kernel = pytest.mark.skipif(decode_attention.kernel() is None,
                                  reason="no C compiler or no AVX-512 BF16 on this CPU")


def reference(q, keys, values, positions, scale):
    """Plain softmax attention in float32 over each row's keys up to its position."""
    out = torch.empty(q.shape)
    for b in range(q.shape[0]):
        n = int(positions[b]) + 1
        p = torch.softmax(q[b].float() @ keys[b, :, :n].float().transpose(-1, -2) * scale, dim=-1)
        out[b] = p @ values[b, :, :n].float()
    return out


@needs_kernel
@pytest.mark.parametrize("B,KV,G,C,D", [(5, 2, 3, 48, 64), (5, 2, 1, 200, 128), (64, 4, 1, 96, 64), (5, 2, 4, 48, 32)])
def test_kernel_matches_float32_attention(B, KV, G, C, D):
    g = torch.Generator().manual_seed(0)
    cache_k, cache_v = (torch.randn(B + 2, KV, C, D, generator=g).bfloat16() for _ in range(2))
    keys, values = cache_k[1:B + 1], cache_v[1:B + 1]  # a view into a larger cache, as the engine's slots
    q = torch.randn(B, KV, G, D, generator=g).bfloat16()
    positions = torch.randint(0, C, (B,), generator=g)
    positions[0], positions[-1] = 0, C - 1  # a first token attends to itself alone; a full row
    assert decode_attention.fits(keys, D)
    out = decode_attention.attend(q, keys, values, positions, D ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # bf16 output and bf16 probabilities, as torch's bf16 attention: a few bf16 ulps of values of order 1
    torch.testing.assert_close(out.float(), reference(q, keys, values, positions, D ** -0.5), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_bf16_decoding_through_the_kernel_gives_transformers_logits(monkeypatch):
    """FastLlama's eager decode of a bf16 Llama (head_dim 32, grouped-query attention) attends through the
    kernel, also over slots that stop being one contiguous run, and still gives transformers' logits to bf16's
    precision (as the compiled bf16 decode's test)."""
    calls = []
    built = decode_attention.kernel()
    monkeypatch.setattr(decode_attention, "kernel", lambda: (lambda *a: calls.append(1) or built(*a)))
    model = _family("llama", hidden_size=128).to(torch.bfloat16)
    _decode_against_transformers(model, FastLlama(model), 0.1)
    assert len(calls) == 70 * model.config.num_hidden_layers


def test_where_the_kernel_does_not_fit_the_ops_run(monkeypatch):
    keys = torch.zeros(2, 2, 16, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(decode_attention, "kernel", lambda: None)  # as on a CPU without AVX-512 BF16
    assert not decode_attention.fits(keys, 64)
    monkeypatch.setattr(decode_attention, "kernel", lambda: object())
    assert decode_attention.fits(keys, 64)
    assert not decode_attention.fits(keys.float(), 64) and not decode_attention.fits(keys[..., :48], 48)
    assert not decode_attention.fits(keys[..., :16], 16)  # head_dim not a multiple of 32


def test_the_kernel_leaves_the_floating_point_mode_alone():
    """Linked with -ffast-math, a library turns on flush-to-zero for the whole process when it loads."""
    decode_attention.kernel()
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_a_kernel_that_cannot_be_built_is_none(monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    assert decode_attention.kernel.__wrapped__() is None
