import math

import pytest

from normlab.lab import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 30, 200])
@pytest.mark.parametrize("p", [0.025, 0.05, 0.5, 0.9, 0.95, 0.975, 0.995])
def test_t_quantile_matches_scipy(p, df):
    assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("t", [-7.0, -1.3, 0.0, 0.4, 2.776, 12.0])
@pytest.mark.parametrize("df", [1, 4, 17])
def test_t_cdf_matches_scipy(t, df):
    assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 3.0, 0.7), (0.5, 20.0, 0.01)])
def test_betainc_matches_scipy(a, b, x):
    from scipy.special import betainc

    assert stats.betainc(a, b, x) == pytest.approx(betainc(a, b, x), rel=1e-10)


def test_interval_is_scipys_t_interval():
    xs = [0.8, 2.1, 1.4, -0.3, 1.9]
    ci = stats.interval(xs)
    mean, sem = sum(xs) / 5, scipy_stats.sem(xs)
    lo, hi = scipy_stats.t.interval(0.95, 4, loc=mean, scale=sem)
    assert (ci.mean, ci.n) == (pytest.approx(mean), 5)
    assert ci.lo == pytest.approx(lo) and ci.hi == pytest.approx(hi)
    assert ci.sd == pytest.approx(scipy_stats.tstd(xs))


def test_interval_of_one_value_is_the_point_and_non_finite_values_are_dropped():
    ci = stats.interval([2.0, math.nan, None, math.inf])
    assert (ci.mean, ci.lo, ci.hi, ci.n) == (2.0, 2.0, 2.0, 1) and math.isnan(ci.sd)
    assert stats.interval([]).n == 0 and math.isnan(stats.interval([]).mean)


def test_noise_floor_pools_the_arms_variances():
    a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 3.0]
    assert stats.noise_floor(a, b) == pytest.approx(math.sqrt((1.0 + 3.0) / 2))
    assert math.isnan(stats.noise_floor([1.0], [2.0]))
    assert stats.effective_margin(0.01, math.nan) == 0.01 and stats.effective_margin(0.01, 0.02) == 0.02


# Known answers: five paired differences with mean 2 and SD 1 give the 95 % interval 2 ± 2.776/√5 = [0.758, 3.242]
FIVE = [2 + d for d in (-math.sqrt(1.6), -math.sqrt(0.4), 0.0, math.sqrt(0.4), math.sqrt(1.6))]


def test_the_known_interval():
    ci = stats.interval(FIVE)
    assert ci.sd == pytest.approx(1.0) and ci.lo == pytest.approx(0.7583, abs=1e-4)


@pytest.mark.parametrize("claim,margin,expected", [
    (">", 0.5, "pass"),      # [0.76, 3.24] above +0.5
    (">", 1.0, "unclear"),   # straddles +1
    (">", 4.0, "fail"),      # wholly below +4
    (">=", 0.5, "pass"),     # above −0.5
    ("<", 0.5, "fail"),      # wholly above −0.5: the other side
    ("<=", 4.0, "pass"),     # wholly below +4
    ("<=", 1.0, "unclear"),
    ("=", 4.0, "pass"),      # inside ±4
    ("=", 0.5, "fail"),      # wholly outside ±0.5
    ("=", 2.0, "unclear"),
])
def test_decide(claim, margin, expected):
    status, ci = stats.decide(FIVE, claim, margin)
    assert status == expected and ci.n == 5


def test_decide_mirrors_and_refuses_unknown_claims():
    neg = [-x for x in FIVE]
    assert stats.decide(neg, "<", 0.5)[0] == "pass" and stats.decide(neg, ">", 0.5)[0] == "fail"
    assert stats.decide([], ">", 0.0)[0] == "unclear"
    with pytest.raises(ValueError, match="unknown claim"):
        stats.decide(FIVE, "!=", 0.0)


def test_one_seed_decides_on_the_point():
    assert stats.decide([0.02], ">", 0.01)[0] == "pass"
    assert stats.decide([0.005], ">", 0.01)[0] == "fail"
    assert stats.decide([0.005], "=", 0.01)[0] == "pass"
