"""arbiter.stats and arbiter.metrics on inputs whose answers are known (by hand, by scipy,
by medmnist's own evaluator)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from arbiter import metrics, stats


def test_mean_and_sample_std_by_hand():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    # sum of squared deviations 5, over n - 1 = 3
    assert stats.std([1, 2, 3, 4]) == pytest.approx(np.sqrt(5 / 3), rel=1e-15)
    assert stats.std([0.7]) == 0.0


def test_welch_against_hand_values_and_scipy():
    a, b = [1, 2, 3, 4, 5], [2, 4, 6, 8, 10]
    w = stats.welch(a, b, "a", "b")
    # var(a)/5 = 0.5, var(b)/5 = 2: se = sqrt(2.5); df = 2.5^2 / (0.5^2/4 + 2^2/4)
    assert w.difference == -3.0
    assert w.t == pytest.approx(-3 / np.sqrt(2.5), rel=1e-12)
    assert w.df == pytest.approx(6.25 / (0.0625 + 1.0), rel=1e-12)
    assert w.p == pytest.approx(2 * sps.t.sf(3 / np.sqrt(2.5), 6.25 / 1.0625), rel=1e-9)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert (w.t, w.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)


def test_welch_degenerate_groups():
    assert stats.welch([0.7, 0.7], [0.7, 0.7]).p == 1.0  # identical constants agree exactly
    assert stats.welch([0.7, 0.7], [0.6, 0.6]).p == 0.0  # no noise explains a gap between constants
    assert np.isnan(stats.welch([0.7], [0.6, 0.65]).p)  # one seed: nothing to test


def test_bootstrap_ci_is_reproducible_and_matches_the_normal_interval():
    x = np.random.default_rng(1).normal(0.0, 1.0, 400)
    lo, hi = stats.bootstrap_ci(x)
    assert (lo, hi) == stats.bootstrap_ci(x)  # fixed RNG: a report is reproducible from the ledger
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    # percentile bootstrap of a mean of 400 normals ~ the normal interval; 10000
    # resamples put its endpoints within ~3% of the half-width
    assert lo == pytest.approx(x.mean() - half, abs=0.05 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.05 * half)
    assert stats.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_minimum_detectable_effect_known_values():
    # normal approximation (z_.975 + z_.8) sqrt(2/n) is exact in the large-n limit
    n = 5000
    assert stats.minimum_detectable_effect(n) == pytest.approx((1.959964 + 0.841621) * np.sqrt(2 / n), rel=2e-3)
    # the textbook value (Cohen; G*Power): n = 20 per group detects d = 0.909 at 80% power
    assert stats.minimum_detectable_effect(20) == pytest.approx(0.909, abs=0.002)
    d3 = stats.minimum_detectable_effect(3)
    assert stats.power_two_sample(d3, 3) == pytest.approx(0.8, abs=1e-8)
    assert stats.minimum_detectable_difference(0.01, 3) == pytest.approx(0.01 * d3)
    assert stats.minimum_detectable_effect(1) == float("inf")


def test_minimum_detectable_effect_by_simulation():
    """t-tests on simulated groups of 5 that differ by the MDE reject 80% of the time."""
    n, d = 5, stats.minimum_detectable_effect(5)
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, n))
    b = rng.normal(d, 1.0, (20000, n))
    p = sps.ttest_ind(a, b, axis=1).pvalue
    # binomial sd of a rate of 0.8 over 20000 draws is 0.003
    assert np.mean(p < 0.05) == pytest.approx(0.8, abs=0.012)


def test_compare_groups_names_the_outlier():
    groups = {"tf": [0.770, 0.772, 0.768], "torch": [0.731, 0.735, 0.729], "flax": [0.733, 0.728, 0.732]}
    r = stats.compare_groups(groups)
    assert (r["verdict"], r["outlier"]) == ("deviates", "tf")
    assert r["seeds"] == 3 and np.isfinite(r["mdd"]) and r["mdd"] > 0
    same = stats.compare_groups({"tf": [0.73, 0.74, 0.72], "torch": [0.735, 0.725, 0.73], "flax": [0.74, 0.72, 0.73]})
    assert (same["verdict"], same["outlier"]) == ("agree", None)


def _scores(n=300, k=7, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    p = np.exp(logits)
    return labels, p / p.sum(axis=1, keepdims=True)


def test_metrics_equal_medmnist_evaluator():
    evaluator = pytest.importorskip("medmnist.evaluator")
    labels, scores = _scores()
    y = labels[:, None].astype(np.uint8)  # MedMNIST's label layout
    assert metrics.accuracy(y, scores) == evaluator.getACC(y, scores, "multi-class")
    assert metrics.auc(y, scores) == pytest.approx(evaluator.getAUC(y, scores, "multi-class"), rel=1e-12)


def test_metrics_by_hand():
    labels = np.array([0, 1, 2, 2])
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    assert metrics.accuracy(labels, scores) == 0.75
    np.testing.assert_array_equal(metrics.confusion(labels, scores, 3), [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    # class 0 AUC: positives {0.8} vs negatives {0.2, 0.5, 0.1} -> 1; class 1: 0.7 vs
    # {0.1, 0.2, 0.1} -> 1; class 2: {0.3, 0.8} vs {0.1, 0.1} -> 1
    assert metrics.auc(labels, scores) == 1.0
    assert metrics.majority_rate(labels) == 0.5
    with pytest.raises(ValueError, match="absent"):
        metrics.auc(np.array([0, 0, 1, 1]), scores)  # class 2 never occurs: undefined, as in medmnist
