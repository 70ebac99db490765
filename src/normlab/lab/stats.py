"""The lab's statistics over paired seeds: Student-t intervals, the noise floor and the verdict of a check.

Every arm of an experiment runs once per seed, and arms of one seed share their data order and (where the
architectures allow) their initial weights, so a check compares arms *within* a seed: its quantity per
seed is a paired difference ``x_s = f(a_s) − f(b_s)``, with ``f = log`` for multiplicative quantities
(ICS, β, predictiveness, ratios of losses) and the identity otherwise. Over n seeds:

* mean ``x̄``, standard deviation ``s`` (n − 1 in the denominator) and the t-interval
  ``x̄ ± t_{1−α/2, n−1} · s / √n`` (95 %: α = 0.05);
* the *noise floor*: the pooled seed-to-seed standard deviation of one arm, ``√((s_a² + s_b²) / 2)``, the
  size of the difference two runs of the same arm show; a check's margin is never below it;
* the decision (:func:`decide`): a directional claim is *reproduced* (``pass``) when the whole interval lies
  on the paper's side of its boundary, *not reproduced* (``fail``) when it lies wholly on the other side,
  and *unclear* when it straddles it. An equivalence ("matches") claim is TOST-style: ``pass`` when the
  90 % interval (two one-sided 5 % tests) lies inside ±margin, ``fail`` when the 95 % interval lies
  wholly outside it, ``unclear`` otherwise.

With one seed there is no interval: the point decides, and the report labels the verdict "indicative".
The t quantile is computed here (regularized incomplete beta by continued fraction, then bisection), so
the lab needs no scipy; tests/lab/test_stats.py checks it against scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95
"""Confidence level of the intervals in the report."""
EQUIVALENCE_LEVEL = 0.90
"""Level of the interval an equivalence claim must lie in (TOST with two one-sided 5 % tests)."""

CLAIMS = (">", ">=", "<", "<=", "=")
"""``>``: a exceeds b by more than the margin; ``>=``: a is not below b by more than the margin (no effect
allowed); ``<`` and ``<=`` the mirror images; ``=``: a and b agree within ±margin."""

PASS, FAIL, UNCLEAR = "pass", "fail", "unclear"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must lie in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """Mean, standard deviation and the two-sided ``level`` t-interval of ``n`` values (one value: no
    spread, the interval is the point)."""

    mean: float
    sd: float
    lo: float
    hi: float
    n: int
    level: float


def finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def interval(values: Sequence[float | None], level: float = LEVEL) -> Interval:
    """The t-interval of the finite ``values`` (NaN everywhere when there are none)."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, level)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, mean, mean, 1, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, sd, mean - half, mean + half, n, level)


def sd(values: Sequence[float | None]) -> float:
    """Sample standard deviation of the finite values (NaN for fewer than two)."""
    return interval(values).sd


def noise_floor(a: Sequence[float | None], b: Sequence[float | None] | None = None) -> float:
    """Pooled seed-to-seed standard deviation of one arm, ``√((s_a² + s_b²) / 2)`` (only ``a``: ``s_a``);
    NaN with fewer than two seeds."""
    sds = [sd(a)] + ([] if b is None else [sd(b)])
    if any(math.isnan(s) for s in sds):
        return math.nan
    return math.sqrt(sum(s * s for s in sds) / len(sds))


def effective_margin(margin: float, floor: float) -> float:
    """The margin a check uses: its stated one, raised to the measured noise floor when that is larger."""
    return margin if math.isnan(floor) else max(margin, floor)


def decide(values: Sequence[float | None], claim: str, margin: float) -> tuple[str, Interval]:
    """pass / fail / unclear for ``claim`` (see :data:`CLAIMS`) on the paired differences ``values`` with
    margin ``margin`` ≥ 0, and the interval the decision was read from. No finite value: unclear."""
    if claim not in CLAIMS:
        raise ValueError(f"unknown claim {claim!r}; choose one of {', '.join(CLAIMS)}")
    ci = interval(values)
    if ci.n == 0:
        return UNCLEAR, ci
    if claim == "=":
        inner = interval(values, EQUIVALENCE_LEVEL)
        if -margin < inner.lo and inner.hi < margin:
            return PASS, ci
        if ci.lo > margin or ci.hi < -margin:
            return FAIL, ci
        return UNCLEAR, ci
    sign = 1.0 if claim.startswith(">") else -1.0
    bound = margin if claim in (">", "<") else -margin  # superiority vs non-inferiority, seen from the claim
    lo, hi = sorted((sign * ci.lo, sign * ci.hi))
    if lo > bound:
        return PASS, ci
    if hi < bound:
        return FAIL, ci
    return UNCLEAR, ci
