import math

import pytest

from normlab.lab import spec
from normlab.lab.spec import Check, Row, combine_checks, combine_rows

# five seeds of arm a and arm b; a − b = 3 + (−√1.6, −√0.4, 0, √0.4, √1.6) points: mean 3, SD 1 → 95% CI
# 3 ± 2.776/√5 = [1.758, 4.242] points
B = [0.500, 0.501, 0.499, 0.5005, 0.4995]
D = [3 - math.sqrt(1.6), 3 - math.sqrt(0.4), 3.0, 3 + math.sqrt(0.4), 3 + math.sqrt(1.6)]
A = [b + d / 100 for b, d in zip(B, D)]


def test_one_seed_compare_is_decided_on_the_point_and_shown_in_points():
    c = Check.compare("a beats b", 0.53, 0.50, ">", 0.01, unit="points")
    assert c.status == "pass" and c.value == "+3.0 points" and c.x == pytest.approx(0.03)
    assert Check.compare("a beats b", 0.505, 0.50, ">", 0.01, unit="points").status == "fail"


def test_paired_seeds_decide_from_the_t_interval():
    per_seed = [[Check.compare("a beats b by 0.5 point", a, b, ">", 0.005, unit="points")] for a, b in zip(A, B)]
    (c,) = combine_checks(per_seed)
    assert c["n"] == 5 and c["mean"] == pytest.approx(0.03) and c["sd"] == pytest.approx(0.01)
    assert c["lo"] == pytest.approx(0.017583, abs=1e-5) and c["hi"] == pytest.approx(0.042417, abs=1e-5)
    assert c["status"] == "pass"  # the CI lies above the margin, itself above the arms' noise floor
    assert c["noise_floor"] == pytest.approx(math.sqrt((spec.stats.sd(A) ** 2 + spec.stats.sd(B) ** 2) / 2))
    assert c["value"] == "+3.0 points [+1.8 points, +4.2 points]"
    (wide,) = combine_checks([[Check.compare("a beats b by 2 points", a, b, ">", 0.02, unit="points")]
                              for a, b in zip(A, B)])
    assert wide["status"] == "unclear"  # [1.76, 4.24] points straddles 2 points


def test_the_margin_is_raised_to_the_measured_noise_floor():
    noisy_b = [0.40, 0.60, 0.45, 0.55, 0.50]
    a = [b + 0.02 for b in noisy_b]  # a constant paired difference: a zero-width interval at +2 points
    (c,) = combine_checks([[Check.compare("t", x, y, ">", 0.01, unit="points")] for x, y in zip(a, noisy_b)])
    assert c["margin"] == pytest.approx(spec.stats.sd(noisy_b)) and c["margin"] > 0.02
    assert c["status"] == "fail" and c["floor_text"] != "—" and c["margin"] == c["noise_floor"]


def test_log_ratio_checks_and_level_checks():
    per_seed = [[Check.compare("ratio > 2", 10.0 * f, 1.0, ">", math.log(2.0), log=True),
                 Check.level("value < 0.5", 0.1 * f, 0.5, "<")] for f in (0.8, 1.0, 1.25, 0.9, 1.1)]
    ratio_check, level = combine_checks(per_seed)
    logs = [math.log(10.0 * f) for f in (0.8, 1.0, 1.25, 0.9, 1.1)]
    assert ratio_check["status"] == "pass" and ratio_check["mean"] == pytest.approx(sum(logs) / 5)
    assert ratio_check["value"].startswith("×9.98 [")  # the geometric mean of the ratios
    assert level["status"] == "pass" and level["margin_text"] == "threshold 0.5"
    assert Check.level("value > 0.9", 0.95, 0.9, ">").value == "0.95"


def test_yes_no_checks_need_every_seed():
    passes, fails = Check.of("t", "v", True, False), Check.of("t", "v", False, True)
    assert combine_checks([[passes], [passes]])[0]["status"] == "pass"
    assert combine_checks([[fails], [fails]])[0]["status"] == "fail"
    mixed = combine_checks([[passes], [fails]])[0]
    assert mixed["status"] == "unclear" and mixed["value"].startswith("1/2 seeds pass")


def test_rows_show_mean_and_sd_over_seeds():
    rows = combine_rows([[Row("acc", "50.0%", "p", 0.5, "pct")], [Row("acc", "52.0%", "p", 0.52, "pct")]])
    assert rows == [{"quantity": "acc", "ours": "51.0% ± 1.4 pts (n=2)", "paper": "p"}]
    assert combine_rows([[Row("t", "x", "p")], [Row("t", "y", "p")]])[0]["ours"] == "x (seed 0)"
    assert combine_rows([[Row("t", "x", "p", 0.5)]])[0]["ours"] == "x"


def test_verdict_and_suites():
    assert spec.verdict(["pass", "pass"]) == "reproduced"
    assert spec.verdict(["pass", "unclear"]) == "inconclusive"
    assert spec.verdict(["unclear", "fail"]) == "not reproduced"
    assert spec.SUITES == ("smoke", "quick", "standard", "full") and spec.SEEDS["standard"] >= 5
    setup = spec.Setup("standard", "fashion-mnist", 3, "cpu", 5)
    assert setup.seed_list() == [3, 4, 5, 6, 7]
