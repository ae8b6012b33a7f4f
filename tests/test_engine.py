"""The engine against plain recomputation: cached greedy equals full-sequence greedy, token for token."""

import torch

from nanor1.engine import Engine, SamplingParams, sample_tokens

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 9, 9, 9, 9, 3]]


def reference_greedy(model, prompt, n):
    """Greedy decoding by recomputing the whole sequence at every step, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_recompute(tiny_model):
    outs = Engine(tiny_model, None, max_batch=8).generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    for prompt, out in zip(PROMPTS, outs):
        assert out.ids == reference_greedy(tiny_model, prompt, 24)
        assert out.finish_reason == "length"


def test_batching_does_not_change_greedy(tiny_model):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    together = Engine(tiny_model, None, max_batch=8).generate(PROMPTS, params)
    alone = [Engine(tiny_model, None, max_batch=1).generate([p], params)[0] for p in PROMPTS]
    assert [o.ids for o in together] == [o.ids for o in alone]


def test_same_seed_same_sample_whatever_the_batch(tiny_model):
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s) for s in range(4)]
    a = Engine(tiny_model, None, max_batch=8).generate(PROMPTS, params)
    b = Engine(tiny_model, None, max_batch=2).generate(PROMPTS[::-1], params[::-1])[::-1]
    assert [o.ids for o in a] == [o.ids for o in b]
    c = Engine(tiny_model, None).generate(PROMPTS, [SamplingParams(max_new_tokens=12, seed=s + 10) for s in range(4)])
    assert [o.ids for o in a] != [o.ids for o in c]


def test_repeated_prompts_prefill_once_and_sample_as_alone(tiny_model):
    """A GRPO group is one prompt G times: prefill runs it once and copies its cache rows, which must change
    nothing: every row samples what it samples alone with its seed, and greedy rows equal recomputation."""
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=s) for s in range(len(prompts))]
    together = Engine(tiny_model, None, max_batch=8).generate(prompts, params)
    alone = [Engine(tiny_model, None, max_batch=1).generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [o.ids for o in together] == [o.ids for o in alone]
    assert len({tuple(o.ids) for o in together}) > 2  # the copies did sample differently
    greedy = Engine(tiny_model, None, max_batch=8).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    assert all(o.ids == reference_greedy(tiny_model, p, 12) for p, o in zip(prompts, greedy))


def test_a_request_that_joins_mid_decode_samples_with_its_own_settings(tiny_model):
    """The engine keeps the running requests' settings as tensors while the set is unchanged: a request with
    top_k = 1 (its argmax) joining a plain sampling one must get its own, and both sample what they sample alone."""
    plain, top1 = SamplingParams(max_new_tokens=12, seed=3), SamplingParams(max_new_tokens=6, seed=4, top_k=1)
    eng = Engine(tiny_model, None, max_batch=4)
    a = eng.add_request(PROMPTS[0], plain)
    for _ in range(3):
        eng.step()
    b = eng.add_request(PROMPTS[1], top1)
    ids: dict[int, list[int]] = {a: [], b: []}
    while eng.has_unfinished():
        for o in eng.step():
            if o.token_id is not None:
                ids[o.request_id].append(o.token_id)
    assert ids[b] == reference_greedy(tiny_model, PROMPTS[1], 6)
    alone = Engine(tiny_model, None).generate([PROMPTS[0]], plain)[0].ids
    assert alone[:3] + ids[a] == alone


def test_top_k_beyond_the_vocabulary_keeps_every_token(tiny_model):
    """top_k = 10**30 (the serve fuzz test sent one) is top_k off, not an int64 overflow."""
    params = [SamplingParams(max_new_tokens=8, seed=s, top_k=k) for s, k in ((1, 0), (2, 0))]
    huge = [SamplingParams(max_new_tokens=8, seed=s, top_k=10 ** 30) for s in (1, 2)]
    off = Engine(tiny_model, None).generate(PROMPTS[:2], params)
    assert [o.ids for o in Engine(tiny_model, None).generate(PROMPTS[:2], huge)] == [o.ids for o in off]


def test_more_prompts_than_slots_and_stop_tokens(tiny_model):
    greedy = reference_greedy(tiny_model, PROMPTS[1], 10)
    stop = greedy[4]
    first = greedy.index(stop)
    outs = Engine(tiny_model, None, max_batch=2).generate(
        PROMPTS * 2, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=(stop,)))
    assert len(outs) == 8
    assert outs[1].ids == greedy[:first] and outs[1].finish_reason == "stop" and outs[1].stop_token_id == stop


def test_logprobs_are_model_logprobs(tiny_model):
    out = Engine(tiny_model, None).generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0.7, seed=1))[0]
    seq = torch.tensor([PROMPTS[0] + out.ids])
    with torch.no_grad():
        logits = tiny_model(seq).logits[0, len(PROMPTS[0]) - 1:-1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 200)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(200)
    tok, _ = sample_tokens(logits, ones, torch.full((200,), 2), ones, u)
    assert set(tok.tolist()) <= {0, 1} and len(set(tok.tolist())) == 2
    # softmax([3,2,1,0]) = [.644, .237, .087, .032]: top_p 0.7 keeps the first two
    tok, _ = sample_tokens(logits, ones, torch.zeros(200, dtype=torch.long), torch.full((200,), 0.7), u)
    assert set(tok.tolist()) <= {0, 1}


def test_samples_follow_the_tempered_distribution():
    """20,000 draws (one uniform number per row) from softmax(logits / T), with a zero-probability token and a filtered
    one: each token's frequency is within 4 standard errors of its probability, and excluded tokens never come."""
    n = 20_000
    logits = torch.tensor([[2.0, 1.0, 0.5, float("-inf"), -1.0, 0.0]]).expand(n, 6)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tok, _ = sample_tokens(logits, torch.full((n,), 0.8), torch.full((n,), 4), torch.ones(n), u)
    probs = torch.softmax(logits[0] / 0.8, -1)
    probs[4] = 0.0  # top_k 4 keeps 2, 1, 0.5 and 0: it drops -1 (and -inf)
    probs /= probs.sum()
    freq = torch.bincount(tok, minlength=6).double() / n
    assert freq[3] == 0 and freq[4] == 0
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-12).all(), (freq, probs)


def test_a_draw_at_the_top_of_the_cdf_never_takes_a_filtered_token():
    """u x total can round up to the total (a float64 uniform just under 1 rounds to 1 in float32); the draw must
    still land on the last kept token, not past it."""
    logits = torch.tensor([[1.0, 2.0, 3.0, -5.0]])
    tok, _ = sample_tokens(logits, torch.ones(1), torch.full((1,), 3), torch.ones(1), torch.ones(1))
    assert tok.tolist() == [2]


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    import pytest
    from nanor1.common import NanoR1Error
    with pytest.raises(NanoR1Error, match="does not fit the context"):
        Engine(tiny_model, None).generate([[1] * 100], SamplingParams(max_new_tokens=4))


def test_abort_frees_the_slot(tiny_model):
    eng = Engine(tiny_model, None, max_batch=1)
    a = eng.add_request([1, 2], SamplingParams(max_new_tokens=50, temperature=0))
    eng.add_request([3, 4], SamplingParams(max_new_tokens=3, temperature=0))
    eng.step()
    eng.abort(a)
    finished = []
    for _ in range(10):
        finished += [o for o in eng.step() if o.finished]
    assert len(finished) == 1 and not eng.has_unfinished()
