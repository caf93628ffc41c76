"""Statistics over seeds: is one framework's accuracy different, or is it seed noise?

Accuracies are given as fractions or points; every function is unit-agnostic.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

from arbiter.compare import verdict as majority_verdict

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed, so a report is reproducible from the ledger alone


def mean(x) -> float:
    return float(np.mean(np.asarray(x, np.float64)))


def std(x) -> float:
    """Sample standard deviation (ddof=1): the seeds are a sample of all possible seeds.
    0 for a single value (nothing to estimate, reported as such rather than NaN)."""
    x = np.asarray(x, np.float64)
    return float(np.std(x, ddof=1)) if x.size > 1 else 0.0


def bootstrap_ci(x, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, with a fixed RNG.

    With 3 seeds the bootstrap distribution has only 10 distinct means: the interval is
    honest about that (it is narrow and coarse), it does not invent spread."""
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Welch:
    a: str
    b: str
    difference: float  # mean(a) - mean(b)
    t: float
    df: float
    p: float

    def to_dict(self) -> dict:
        return asdict(self)


def welch(x, y, a: str = "a", b: str = "b") -> Welch:
    """Welch's unequal-variance t-test (scipy.stats.ttest_ind, equal_var=False). Two
    groups with zero variance and equal means give p = 1 (they agree exactly); with
    different means, p = 0 (no noise can explain a gap between constants)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Welch(a, b, diff, float("nan"), float("nan"), float("nan"))
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    if vx + vy == 0:
        return Welch(a, b, diff, 0.0 if diff == 0 else float("inf"), float(x.size + y.size - 2), 1.0 if diff == 0 else 0.0)
    res = stats.ttest_ind(x, y, equal_var=False)
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    return Welch(a, b, diff, float(res.statistic), float(df), float(res.pvalue))


def power_two_sample(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided two-sample t-test (n per group, equal variances) to detect a
    standardised difference `effect` (difference / sd), from the noncentral t."""
    df = 2 * n - 2
    nc = effect * np.sqrt(n / 2)
    tcrit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(tcrit, df, nc) + stats.nct.cdf(-tcrit, df, nc))


def minimum_detectable_effect(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest standardised difference (in units of the per-seed sd) that a two-sided
    two-sample t-test with n seeds per framework detects with the given power."""
    if n < 2:
        return float("inf")
    hi = 1.0
    while power_two_sample(hi, n, alpha) < power:  # bracket the root (nct is NaN far out)
        hi *= 2
    return float(optimize.brentq(lambda d: power_two_sample(d, n, alpha) - power, 0.0, hi, xtol=1e-12))


def minimum_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The same, in accuracy units, for a per-seed standard deviation `sd`."""
    return float(sd * minimum_detectable_effect(n, alpha, power))


def pooled_sd(groups: dict[str, list[float]]) -> float:
    """Pooled within-framework standard deviation (the seed noise)."""
    num = sum((len(v) - 1) * std(v) ** 2 for v in groups.values() if len(v) > 1)
    den = sum(len(v) - 1 for v in groups.values() if len(v) > 1)
    return float(np.sqrt(num / den)) if den else float("nan")


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    values: tuple[float, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "values": list(self.values)}


def summarise(x) -> Summary:
    x = [float(v) for v in x]
    lo, hi = bootstrap_ci(x)
    return Summary(len(x), mean(x), std(x), lo, hi, tuple(x))


def compare_groups(groups: dict[str, list[float]], alpha: float = ALPHA, power: float = POWER) -> dict:
    """Everything the comparison report says about accuracies grouped by framework:
    summaries, pairwise Welch tests, the verdict and the minimum detectable difference.

    Verdict: a pair 'agrees' when its Welch p-value is >= alpha. With three frameworks
    the 2-of-3 rule of arbiter.compare names the outlier when exactly one pair agrees;
    'agree' means all pairs are within noise (at the power stated by the MDD)."""
    names = tuple(groups)
    tests = [welch(groups[a], groups[b], a, b) for a, b in itertools.combinations(names, 2)]
    agreeing = {(t.a, t.b): not (t.p < alpha) for t in tests}  # NaN p (n < 2) counts as agreeing
    v, odd = majority_verdict(agreeing, names)
    ns = [len(v_) for v_ in groups.values()]
    n = min(ns) if ns else 0
    sd = pooled_sd(groups)
    return {
        "alpha": alpha,
        "power": power,
        "summaries": {k: summarise(v_).to_dict() for k, v_ in groups.items()},
        "welch": [t.to_dict() for t in tests],
        "verdict": v,
        "outlier": odd,
        "seeds": n,
        "pooled_sd": sd,
        "mde_effect": minimum_detectable_effect(n, alpha, power) if n >= 2 else float("inf"),
        "mdd": minimum_detectable_difference(sd, n, alpha, power) if n >= 2 and np.isfinite(sd) else float("nan"),
    }
