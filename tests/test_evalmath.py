"""pass@k, majority vote and intervals against hand-computed values and exact binomial formulas."""

import math
import random
from fractions import Fraction

import pytest

from nanor1.evalmath import (cluster_interval, majority_vote, paired_difference, pass_at_k,
                             wilson_interval)


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 1, 0.3),           # pass@1 = c/n
    (10, 2, 5, 1 - 56 / 252),  # 1 - C(8,5)/C(10,5)
    (4, 0, 2, 0.0),            # nothing correct
    (4, 3, 2, 1.0),            # only one wrong sample: every pair holds a correct one
    (4, 2, 4, 1.0),            # k = n: pass iff any correct
    (4, 0, 4, 0.0),
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_and_is_stable():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    # large n where the binomials have ~60 digits: the product form stays accurate
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_is_the_mean_over_k_subsets():
    """Definition check: the fraction of k-subsets of the n samples that contain a correct one."""
    import itertools
    samples = [1, 0, 0, 1, 0, 0]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("bad", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        pass_at_k(*bad)


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"   # None never wins
    assert majority_vote(["a", "b", "b", "a"]) == "a"                 # tie: first seen
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote([None, "7"]) == "7"
    # a key merges forms; the first occurrence of the winning form is returned
    assert majority_vote([" 12", "13", "12 ", "13", "12"], key=str.strip) == " 12"


def test_wilson_interval_hand_values():
    # 8/10 at 95%: the textbook Wilson interval (0.4902, 0.9433)
    est = wilson_interval(8, 10)
    assert est.value == pytest.approx(0.8)
    assert est.lo == pytest.approx(0.490157, abs=1e-6)
    assert est.hi == pytest.approx(0.943319, abs=1e-6)
    # 0/20: lower bound 0, upper bound z^2 / (n + z^2)
    est = wilson_interval(0, 20)
    assert est.lo == 0.0 and est.hi == pytest.approx(1.96 ** 2 / (20 + 1.96 ** 2))
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_cluster_interval_reduces_to_wilson_for_one_binary_sample():
    rng = random.Random(0)
    xs = [float(rng.random() < 0.3) for _ in range(40)]
    a, b = cluster_interval(xs, samples_per_unit=1), wilson_interval(sum(xs), 40)
    assert a == pytest.approx(b)


def test_cluster_interval_hand_value():
    # per-problem means of k=2 samples: p = .5, s^2 = 1/6, SE^2 = 1/24, n_eff = .25 * 24 = 6 in [4, 8]
    est = cluster_interval([1.0, 0.5, 0.0, 0.5], samples_per_unit=2)
    assert est.value == pytest.approx(0.5)
    assert (est.lo, est.hi) == pytest.approx((0.187613, 0.812387), abs=1e-6)   # Wilson(3, 6)


def test_cluster_interval_clamps_design_effect():
    # identical problem means: no between-problem spread, so n_eff hits the ceiling m*k (all samples)
    assert cluster_interval([0.5] * 10, samples_per_unit=4) == pytest.approx(wilson_interval(20, 40))
    # all wrong: n_eff is the floor m (problems), wider than pretending 40 independent samples
    est = cluster_interval([0.0] * 10, samples_per_unit=4)
    assert est == pytest.approx(wilson_interval(0, 10))
    assert est.hi > wilson_interval(0, 40).hi
    with pytest.raises(ValueError):
        cluster_interval([])
    with pytest.raises(ValueError):
        cluster_interval([1.5])


def test_paired_difference_hand_value():
    a = [1, 1, 0, 1, 0, 0, 1, 1]
    b = [0, 1, 0, 1, 0, 1, 1, 0]   # d = [1,0,0,0,0,-1,0,1]: mean 1/8, s^2 = 2.875/7
    est = paired_difference(a, b)
    assert est.value == pytest.approx(0.125)
    half = 1.96 * math.sqrt(2.875 / 7 / 8)
    assert (est.lo, est.hi) == pytest.approx((0.125 - half, 0.125 + half))
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)  # same answers: no difference
    assert paired_difference([1, 1, 1, 0], [0, 0, 0, 1]).hi == 1.0     # clipped to [-1, 1]
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])
