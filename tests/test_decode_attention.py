"""The decode-step attention kernel against attention written out in float32, and inside FastLlama's decode."""

from unittest import mock

import pytest
import torch
from test_hf_llama import VOCAB, _decode_against_transformers, _family

from nanor1 import decode_attention
from nanor1.common import _can_pack_bf16
from nanor1.engine import ModelBackend
from nanor1.hf_llama import FastLlama

needs_kernel = pytest.mark.skipif(decode_attention.kernel() is None,
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
    q = torch.randn(B, KV, G, D, generator=g).bfloat16()
    slots = torch.randperm(n_slots, generator=g)
    rows = slots[:B]  # slots in any order, not all of them
    positions = torch.randint(0, C, (B,), generator=g)
    positions[0], positions[-1] = 0, C - 1  # a first token attends to itself alone; a full row
    # rows 1 and 2 read a prompt from a slot that none of them writes into (a source writes past its prompt):
    # one shorter than their position, and one past it
    source, shared = rows.clone(), torch.zeros(B, dtype=torch.long)
    source[1], shared[1] = slots[B], int(positions[1]) // 2
    source[2], shared[2] = slots[B + 1], C
    k, v = (torch.randn(B, KV, 1, D, generator=g).bfloat16() for _ in range(2))
    assert decode_attention.fits(cache_k, D)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    out = decode_attention.attend(q, k, v, cache_k, cache_v, rows, source, shared, positions, D ** -0.5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # the new keys and values are written at each row's position, and nothing else is
    before_k[rows, :, positions], before_v[rows, :, positions] = k[:, :, 0], v[:, :, 0]
    assert torch.equal(cache_k, before_k) and torch.equal(cache_v, before_v)
    expected = reference(q, cache_k, cache_v, rows, source, shared, positions, D ** -0.5)
    # bf16 output and bf16 probabilities, as torch's bf16 attention: a few bf16 ulps of values of order 1
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


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


@needs_kernel
def test_a_released_prompt_source_hands_its_prompt_to_the_rows_still_reading_it():
    """Slots 2 and 3 repeat slot 0's prompt and read it from slot 0. Slot 0 finishes first and takes a new
    prompt: 2 and 3 must keep their prompt (a copy, made at the release) and every row must still give
    transformers' logits for its own sequence."""
    model = _family("llama", hidden_size=128).to(torch.bfloat16)
    backend = ModelBackend(FastLlama(model), n_slots=4)
    cache = backend.cache
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 4, 11))
    seqs, logits = [list(a), list(b), list(a), list(a)], [[], [], [], []]
    starts = [len(a) - 1, len(b) - 1, len(a) - 1, len(a) - 1]  # where each slot's logits begin

    def step(slots, n):
        for _ in range(n):
            tokens = torch.randint(0, VOCAB, (len(slots),), generator=g)
            for slot, t, row in zip(slots, tokens.tolist(), backend.decode(tokens, slots)):
                logits[slot].append(row)
                seqs[slot].append(t)

    for slot, row in zip(range(4), backend.prefill(seqs, [0, 1, 2, 3])):
        logits[slot].append(row)
    assert cache.share_prompts and cache.source.tolist() == [0, 1, 0, 0] and cache.shared[2:].tolist() == [7, 7]
    step([0, 1, 2, 3], 5)
    backend.release(0)
    assert cache.source.tolist() == [0, 1, 2, 3] and cache.shared.tolist() == [0, 0, 0, 0]
    for seq in (seqs[0], logits[0]):
        seq.clear()
    seqs[0], starts[0] = list(c), len(c) - 1
    logits[0].append(backend.prefill([c], [0])[0])
    step([0, 1, 2, 3], 6)
    for slot in range(4):
        with torch.no_grad():
            ref = model(torch.tensor([seqs[slot]])).logits[0, starts[slot]:].float()
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
