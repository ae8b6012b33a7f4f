"""GRPO math (nanor1/rl.py) against hand-computed numbers and torch references."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanor1.common import NanoR1Error
from nanor1.config import load_config
from nanor1.rl import (ADV_EPS, AdvantageScale, GRPOLossConfig, LossAggregation, gather_logprobs,
                       group_advantages, k3_kl, policy_loss, token_entropy, zero_variance_groups)

SEQ, TOK, CONST = LossAggregation.SEQUENCE_MEAN, LossAggregation.TOKEN_MEAN, LossAggregation.CONSTANT_NORM


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_sample_std():
    # rewards [1,0,0,1]: mean .5, deviations +-.5, sample variance (4 * .25) / (4 - 1) = 1/3, std = .57735
    # -> A = +-.5 / (.57735 + 1e-4) = +-.86588
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.865876, abs=1e-6)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a]))
    # the population std (.5) would give +-.9998: pin that we use the sample std, as TRL does
    assert not torch.allclose(adv.abs(), torch.full((4,), 0.5 / (0.5 + 1e-4)), atol=1e-3)


def test_group_advantages_groups_are_independent_and_shape_kept():
    # group 1 [1, 0]: mean .5, sample std sqrt((.25 + .25) / 1) = .70711 -> A = +-.5 / (.70711 + 1e-4) = +-.70701
    # group 2 [.5, .5]: all equal, std 0 -> A = 0 / (0 + 1e-4) = 0
    r = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    adv = group_advantages(r, 2)
    a = 0.5 / (math.sqrt(0.5) + ADV_EPS)
    assert adv.shape == (2, 2)
    torch.testing.assert_close(adv, torch.tensor([[a, -a], [0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(r.flatten(), 2), adv.flatten())


def test_equal_rewards_give_exactly_zero_advantages():
    """A group of equal rewards has advantage 0 exactly, not float32 rounding noise (eight rewards of 0.1 gave
    +-7e-5 with the mean taken in float32): GRPO's update skips such groups on that test."""
    for value in (0.1, 0.3, 0.7, 1 / 3, 0.937):
        for G in (2, 3, 7, 8, 12, 16):
            for scale in AdvantageScale:
                assert torch.equal(group_advantages(torch.full((3 * G,), value), G, scale), torch.zeros(3 * G))


def test_group_advantages_dr_grpo_only_centres():
    # [1,0,0,0]: mean .25 -> [.75, -.25, -.25, -.25]; [3, 1]: mean 2 -> [1, -1], no std division
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 2.0]), 4, AdvantageScale.NONE)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 1.0, -1.0, 0.0, 0.0]))


def test_group_advantages_unit_sample_std_per_group():
    r = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(r, 8, eps=0.0)
    torch.testing.assert_close(adv.sum(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.std(1, correction=1), torch.ones(5))


def test_group_advantages_bad_input():
    with pytest.raises(NanoR1Error, match="group_size"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 3), 2)


def test_zero_variance_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    flat, frac = zero_variance_groups(r.flatten(), 3)
    assert flat.tolist() == [True, False, True, True]
    assert frac == pytest.approx(0.75)  # 3 of 4 groups give no gradient


# ----------------------------------------------------------------------------- clipping

def _one_token(ratio: float, adv: float, eps_low=0.2, eps_high=0.2):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1),
                              eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize("ratio, adv, loss, grad, low, high", [
    # A > 0, ratio 1.5 above 1.2: min(1.5, 1.2) = 1.2 -> loss -1.2, clipped, no gradient
    (1.5, 1.0, -1.2, 0.0, 0, 1),
    # A > 0, ratio .5 below .8: min(.5, .8) = .5 -> loss -.5, not clipped, d(-rho)/dlogp = -rho = -.5
    (0.5, 1.0, -0.5, -0.5, 0, 0),
    # A < 0, ratio .5 below .8: min(-.5, -.8) = -.8 -> loss .8, clipped, no gradient
    (0.5, -1.0, 0.8, 0.0, 1, 0),
    # A < 0, ratio 1.5 above 1.2: min(-1.5, -1.2) = -1.5 -> loss 1.5, not clipped, d(rho)/dlogp = 1.5
    (1.5, -1.0, 1.5, 1.5, 0, 0),
    # A = 2 inside the band: loss -rho*A = -2.2, gradient -rho*A = -2.2
    (1.1, 2.0, -2.2, -2.2, 0, 0),
])
def test_clipping_cases(ratio, adv, loss, grad, low, high):
    got_loss, got_grad, stats = _one_token(ratio, adv)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)
    assert stats["clip_low_frac"].item() == low and stats["clip_high_frac"].item() == high
    assert stats["clip_frac"].item() == low + high


def test_clip_higher_asymmetric_band():
    # eps_high .28: ratio 1.25 < 1.28 is inside the band -> loss -1.25 (symmetric .2 clips it to -1.2)
    assert _one_token(1.25, 1.0, 0.2, 0.28)[0] == pytest.approx(-1.25)
    assert _one_token(1.25, 1.0, 0.2, 0.2)[0] == pytest.approx(-1.2)
    # ratio 1.4 is clipped at the new upper bound 1.28
    assert _one_token(1.4, 1.0, 0.2, 0.28)[0] == pytest.approx(-1.28)
    # the lower side is unchanged: A = -1, ratio .7 -> min(-.7, -.8) = -.8 -> loss .8
    assert _one_token(0.7, -1.0, 0.2, 0.28)[0] == pytest.approx(0.8)


def test_stats_over_masked_tokens():
    # tokens with A = +1 and ratios 1.5 (clipped high), 1.0, .5; a 4th token (ratio 10) is padding
    ratios = torch.tensor([[1.5, 1.0], [0.5, 10.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, stats = policy_loss(ratios.log(), torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.5) / 3)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    assert stats["tokens"].item() == 3
    assert "kl" not in stats


# ----------------------------------------------------------------------------- KL

def test_k3_kl_values():
    logp = torch.tensor([-1.0, -2.0, -0.3])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    # d = ref - logp = .5: e^.5 - .5 - 1 = .148721; d = -.5: e^-.5 + .5 - 1 = .106531
    torch.testing.assert_close(k3_kl(torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.5])),
                               torch.tensor([math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5]))
    assert (k3_kl(torch.randn(100), torch.randn(100)) > 0).all()


def test_k3_kl_is_unbiased():
    # E_{x~pi}[ref/pi - log(ref/pi) - 1] = 1 + KL(pi || ref) - 1, computed exactly over a 7-token vocab
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(7, generator=g).log_softmax(0), torch.randn(7, generator=g).log_softmax(0)
    expected = (logp.exp() * k3_kl(logp, ref)).sum()
    torch.testing.assert_close(expected, F.kl_div(ref, logp, log_target=True, reduction="sum"))


def test_kl_penalty_in_loss():
    # ratio 1 and A = 0: no policy-gradient term; ref - logp = .5 -> KL .148721, loss = beta * KL
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1),
                              ref_logp=torch.full((1, 1), 0.5), beta=0.1)
    kl = math.exp(0.5) - 1.5
    assert loss.item() == pytest.approx(0.1 * kl)
    assert stats["kl"].item() == pytest.approx(kl) and stats["pg_loss"].item() == 0.0
    loss.backward()  # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)
    assert logp.grad.item() == pytest.approx(0.1 * (1 - math.exp(0.5)))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), beta=0.1)


# ----------------------------------------------------------------------------- aggregation

# two sequences: o_1 has 3 tokens with A = .5, o_2 has 1 token with A = -2 (T = 3, one pad)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([0.5, -2.0])


def _at_ratio_one(agg, **kw):
    old = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    logp = old.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, ADV, MASK, loss_agg=agg, **kw)
    loss.backward()
    return loss.item(), logp.grad


def test_sequence_mean_gradient_at_ratio_one():
    # ratio 1, beta 0: L = -1/N sum_i 1/|o_i| sum_t rho_it A_i and d rho / d logp = rho = 1,
    # so dL/dlogp_it = -A_i / (N |o_i|): o_1: -.5 / (2 * 3) = -1/12; o_2: 2 / (2 * 1) = 1; padding 0
    # value: per-token loss is -A_i, each sequence's mean is -A_i: (-.5 + 2) / 2 = .75
    loss, grad = _at_ratio_one(SEQ)
    assert loss == pytest.approx(0.75)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 12, -1 / 12, -1 / 12], [1.0, 0.0, 0.0]]))


def test_token_mean_weighs_tokens_not_sequences():
    # DAPO: sum over 4 tokens / 4 = (3 * -.5 + 1 * 2) / 4 = .125 (sequence mean gave .75: the long answer
    # now counts 3 times); gradient -A_i / 4 on every token
    loss, grad = _at_ratio_one(TOK)
    assert loss == pytest.approx(0.125)
    torch.testing.assert_close(grad, torch.tensor([[-0.125, -0.125, -0.125], [0.5, 0.0, 0.0]]))


def test_constant_norm():
    # Dr. GRPO with max_len 5: (3 * -.5 + 2) / (2 * 5) = .05; gradient -A_i / 10
    loss, grad = _at_ratio_one(CONST, max_len=5)
    assert loss == pytest.approx(0.05)
    torch.testing.assert_close(grad, torch.tensor([[-0.05, -0.05, -0.05], [0.2, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="max_len"):
        _at_ratio_one(CONST)


def test_token_and_sequence_mean_agree_on_equal_lengths():
    g = torch.Generator().manual_seed(3)
    logp, old, adv = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    mask = torch.ones(3, 4)
    seq, _ = policy_loss(logp, old, adv, mask, loss_agg=SEQ)
    tok, _ = policy_loss(logp, old, adv, mask, loss_agg=TOK)
    const, _ = policy_loss(logp, old, adv, mask, loss_agg=CONST, max_len=4)
    torch.testing.assert_close(seq, tok)
    torch.testing.assert_close(seq, const)


@pytest.mark.parametrize("agg", list(LossAggregation))
def test_micro_batches_sum_to_the_full_batch(agg):
    # accumulation invariant: two micro-batches of 2, told the full batch's counts, add up to one batch of 4
    g = torch.Generator().manual_seed(4)
    logp, old = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g) * 0.3
    ref, adv = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    mask = (torch.arange(5) < torch.tensor([[5], [2], [4], [1]])).float()
    kw = dict(loss_agg=agg, max_len=5, beta=0.05, eps_high=0.28)
    full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    parts = sum(policy_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], num_seqs=4,
                            num_tokens=int(mask.sum()), **kw)[0] for s in (slice(0, 2), slice(2, 4)))
    torch.testing.assert_close(parts, full)


def test_padding_cannot_poison_loss_or_grad():
    logp = torch.tensor([[-1.0, float("-inf")], [-0.5, float("nan")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("nan")], [-0.4, float("-inf")]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss, stats = policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, ref_logp=old, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats["kl"]) and torch.isfinite(logp.grad).all()
    assert logp.grad[:, 1].eq(0).all()


# ----------------------------------------------------------------------------- log-probs and entropy

def test_gather_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        got = gather_logprobs(logits, tokens, temp)
        ref = torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(got, ref)
        (g1,) = torch.autograd.grad(got.sum(), logits)
        (g2,) = torch.autograd.grad(ref.sum(), logits)
        torch.testing.assert_close(g1, g2)


def test_gather_logprobs_bf16_in_float32():
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 4, 50, generator=g) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (3, 4), generator=g)
    ref = torch.log_softmax(logits.float() / 0.8, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for chunk_values in (1 << 24, 400, 1):  # all three sequences at once, two then one, one at a time
        got = gather_logprobs(logits, tokens, 0.8, chunk_values=chunk_values)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref)


def test_gather_logprobs_bad_input():
    with pytest.raises(NanoR1Error, match="temperature"):
        gather_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError):
        gather_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_token_entropy_hand_computed():
    # row 1 uniform over 4: H = log 4 = 1.386294; row 2 p = [.25, .75, 0, 0]:
    # H = -(.25 log .25 + .75 log .75) = .562335; row 3 is masked out -> mean (1.386294 + .562335) / 2 = .974315
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(0.25), math.log(0.75), -inf, -inf],
                            [9.0, 0.0, 0.0, 0.0]]])
    h = token_entropy(logits, torch.tensor([[1, 1, 0]]))
    assert h.item() == pytest.approx(0.974315, abs=1e-6)
    assert token_entropy(logits, torch.zeros(1, 3)).item() == 0.0


def test_token_entropy_matches_definition():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 17, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.4
    for temp in (1.0, 1.5):
        ref = torch.distributions.Categorical(logits=logits / temp).entropy()[mask].mean()
        torch.testing.assert_close(token_entropy(logits, mask, temp, chunk=4), ref)
    torch.testing.assert_close(token_entropy(logits.bfloat16(), mask),
                               torch.distributions.Categorical(logits=logits.bfloat16().float()).entropy()[mask].mean())


# ----------------------------------------------------------------------------- config

def test_config_defaults_overrides_and_validation():
    cfg = GRPOLossConfig()
    cfg.validate()
    assert (cfg.eps_low, cfg.eps_high, cfg.loss_agg, cfg.adv_scale) == (0.2, 0.2, SEQ, AdvantageScale.GROUP_STD)
    assert cfg.needs_ref
    dapo = load_config(GRPOLossConfig, None, ["eps_high=0.28", "beta=0", "loss_agg=token_mean", "adv_scale=none"])
    assert (dapo.eps_high, dapo.loss_agg, dapo.adv_scale, dapo.needs_ref) == (0.28, TOK, AdvantageScale.NONE, False)
    with pytest.raises(NanoR1Error, match="loss_agg"):
        load_config(GRPOLossConfig, None, ["loss_agg=mean"])
    for bad in (["eps_low=1.0"], ["eps_high=-0.1"], ["beta=-1"]):
        with pytest.raises(NanoR1Error):
            load_config(GRPOLossConfig, None, bad)
