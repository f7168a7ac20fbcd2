"""Statistics: known values of the intervals, the paired bootstrap and the exact sign test, and how a paired
interval is read (beats / holds / worse / unclear)."""

import pytest

from leank_ref.stats import mean_interval, paired_bootstrap, sign_test, verdict, wilson_interval


def test_wilson_and_mean_intervals_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(25, 50)
    assert (lo, hi) == pytest.approx((0.3664, 0.6336), abs=1e-4)
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(1.959964 / 3**0.5, rel=1e-5) and mean - lo == hi - mean


def test_paired_bootstrap_sees_a_small_shift_that_unpaired_noise_hides():
    base = [float(i % 7) * 3.0 for i in range(40)]  # large between-sample spread
    shifted = [x - 0.1 + 0.01 * (i % 3) for i, x in enumerate(base)]  # every sample a little worse
    out = paired_bootstrap(shifted, base)
    assert out["n"] == 40 and out["high"] < 0 and out["low"] <= out["mean"] <= out["high"]
    assert out["mean"] == pytest.approx(-0.1 + 0.01 * 39 / 40)  # i % 3 sums to 39 over 40 samples
    assert mean_interval(shifted)[2] > mean_interval(base)[1]  # the unpaired intervals overlap
    same = paired_bootstrap(base, base)
    assert (same["low"], same["mean"], same["high"]) == (0.0, 0.0, 0.0)
    one = paired_bootstrap([0.2, 0.4, 0.6])
    assert one["mean"] == pytest.approx(0.4) and 0.2 <= one["low"] < 0.4 < one["high"] <= 0.6
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        paired_bootstrap([float("nan")], [1.0])


def test_sign_test_exact_values():
    # 9 wins, 1 loss, 2 ties: p = 2 * P(X <= 1 | Bin(10, 1/2)) = 2 * 11 / 1024
    a = [1] * 9 + [0] + [1, 0]
    b = [0] * 9 + [1] + [1, 0]
    out = sign_test(a, b)
    assert (out["wins_a"], out["wins_b"], out["ties"]) == (9, 1, 2)
    assert out["p"] == pytest.approx(22 / 1024)
    assert sign_test([1, 0], [1, 0])["p"] == 1.0  # all ties: no evidence
    assert sign_test([1] * 5, [0] * 5)["p"] == pytest.approx(2 / 32)


@pytest.mark.parametrize(
    ("low", "high", "tolerance", "expected"),
    [(0.01, 0.2, 0.1, "beats"), (-0.05, 0.2, 0.1, "holds"), (-0.3, -0.01, 0.1, "worse"), (-0.3, 0.2, 0.1, "unclear")],
)
def test_verdict(low, high, tolerance, expected):
    assert verdict(low, high, tolerance) == expected
