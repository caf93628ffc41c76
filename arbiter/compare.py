"""Pairwise errors, tolerances and the 2-of-3 verdict.

Two tensors agree when every element satisfies |a - b| <= atol + rtol * max(|a|, |b|)
(numpy's allclose, made symmetric so the pair's order does not matter). A stage's pair
agrees when all of its tensors do.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

AGREE, DEVIATES, NO_MAJORITY, DIFFER, SINGLE = "agree", "deviates", "no-majority", "differ", "single-framework"


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str
    # 'element': rtol scales each element's own magnitude (numpy's allclose);
    # 'tensor': rtol scales the tensor's largest magnitude, for sums whose small elements
    # are cancellations (gradients)
    relative_to: str = "element"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairError:
    max_abs: float
    max_rel: float  # max |a-b| / max(|a|, |b|) over elements where that is non-zero
    excess: float  # max |a-b| / (atol + rtol * max(|a|,|b|)); <= 1 means within tolerance
    excluded: int = 0  # elements left out because their gradient is round-off (see roundoff_mask)

    @property
    def agree(self) -> bool:
        return self.excess <= 1.0

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "excess": self.excess, "agree": self.agree, "excluded": self.excluded}


# Two frameworks' gradients that differ by more than this fraction of their size are
# round-off, not signal: Adam's first steps (m_hat / sqrt(v_hat) ~ sign(g)) turn such noise
# into updates of up to +-lr, so those elements are excluded from the step comparisons and
# counted instead.
ROUNDOFF_RELATIVE = 1e-4


def roundoff_mask(grad_a: np.ndarray, grad_b: np.ndarray) -> np.ndarray:
    """True where the two gradients disagree by more than ROUNDOFF_RELATIVE of their size."""
    ga, gb = np.asarray(grad_a, np.float64), np.asarray(grad_b, np.float64)
    return np.abs(ga - gb) > ROUNDOFF_RELATIVE * np.maximum(np.abs(ga), np.abs(gb))


def pair_error(a: np.ndarray, b: np.ndarray, tol: Tolerance, exclude: np.ndarray | None = None) -> PairError:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return PairError(float("inf"), float("inf"), float("inf"))
    excluded = 0
    if exclude is not None:
        excluded = int(exclude.sum())
        a, b = a[~exclude], b[~exclude]
    if a.size == 0:
        return PairError(0.0, 0.0, 0.0, excluded)
    diff = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    if tol.relative_to == "tensor":
        scale = np.full_like(scale, scale.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(scale > 0, diff / scale, 0.0)
        excess = diff / (tol.atol + tol.rtol * scale)
    excess = np.where(diff == 0, 0.0, excess)
    return PairError(float(diff.max()), float(rel.max()), float(excess.max()), excluded)


def pairs(frameworks: tuple[str, ...]) -> list[tuple[str, str]]:
    return list(itertools.combinations(frameworks, 2))


def pair_key(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def verdict(agreeing: dict[tuple[str, str], bool], frameworks: tuple[str, ...]) -> tuple[str, str | None]:
    """(verdict, deviator). Three frameworks: all pairs agree -> agree; exactly one pair
    agrees -> the framework outside it deviates; otherwise no majority (none agree, or a
    chain a~b~c with a!~c, which names no single outlier). Two frameworks: agree or differ
    (no majority is possible)."""
    if len(frameworks) < 2:
        return SINGLE, None
    ok = [p for p, good in agreeing.items() if good]
    if len(ok) == len(agreeing):
        return AGREE, None
    if len(frameworks) == 2:
        return DIFFER, None
    if len(ok) == 1 and len(frameworks) == 3:
        (odd,) = set(frameworks) - set(ok[0])
        return DEVIATES, odd
    return NO_MAJORITY, None
