"""Temperature calibration: recovers a known temperature, never worse than T = 1 where it is fitted."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmcx.calibrate import T_MAX, T_MIN, calibrated_nll, fit_temperature
from lmcx.errors import LmcxError


def _sample(n=20000, classes=10, scale=3.0, seed=0):
    """Logits whose labels are drawn from softmax(logits): the NLL-optimal temperature is 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * scale
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("true_t", [0.02, 0.125, 0.7, 3.0, 40.0])
def test_recovers_known_temperature(true_t):
    z, y = _sample()
    fitted = fit_temperature(z * true_t, y)  # softmax(z * T / T) is the true distribution
    assert abs(fitted / true_t - 1) < 0.02, (true_t, fitted)


def test_minimises_nll_exactly():
    z, y = _sample(n=3000, seed=1)
    t = fit_temperature(z * 0.3, y)
    best = calibrated_nll(z * 0.3, y, t)
    for factor in (0.99, 1.01, 0.9, 1.1):
        assert best <= calibrated_nll(z * 0.3, y, t * factor)


@pytest.mark.parametrize("case", ["calibrated", "overconfident", "underconfident", "random_labels",
                                  "always_wrong", "separable", "constant", "few"])
def test_never_worse_than_t1_on_fitting_data(case):
    g = torch.Generator().manual_seed(3)
    z, y = _sample(n=2000, seed=2)
    if case == "overconfident":
        z = z * 8
    elif case == "underconfident":
        z = z / 8
    elif case == "random_labels":
        y = torch.randint(0, 10, y.shape, generator=g)
    elif case == "always_wrong":
        z = -F.one_hot(y, 10).float() * 5
    elif case == "separable":
        z = F.one_hot(y, 10).float() * 5
    elif case == "constant":
        z = torch.zeros_like(z)
    elif case == "few":
        z, y = z[:3], y[:3]
    t = fit_temperature(z, y)
    assert T_MIN <= t <= T_MAX and math.isfinite(t)
    assert calibrated_nll(z, y, t) <= calibrated_nll(z, y, 1.0) + 1e-12
    if case == "separable":
        assert t < 0.01  # sharpen as far as allowed
    if case == "always_wrong":
        assert t > 100  # flatten towards uniform


def test_bad_input():
    z, y = _sample(n=10)
    assert fit_temperature(torch.full_like(z, float("nan")), y) == 1.0
    with pytest.raises(LmcxError, match="calibration split is empty"):
        fit_temperature(z[:0], y[:0])
    with pytest.raises(LmcxError, match="temperature must be > 0"):
        calibrated_nll(z, y, 0.0)
    assert calibrated_nll(z, y, 1.0) == pytest.approx(F.cross_entropy(z, y).item(), rel=1e-6)


def test_calibration_check_flags_small_splits_and_endpoints_made_worse():
    from lmcx.calibrate import MIN_RELIABLE_CALIB, calibration_check

    good = calibration_check(5000, (0.10, 0.12), (0.09, 0.12))
    assert good["reliable"] and good["reasons"] == [] and good["calib_size"] == 5000
    small = calibration_check(MIN_RELIABLE_CALIB - 1, (0.10, 0.12), (0.09, 0.12))
    assert not small["reliable"] and "calibration split" in small["reasons"][0]
    worse = calibration_check(5000, (0.10, 0.12), (0.10, 0.125))  # endpoint B 4 % above its raw loss
    assert not worse["reliable"] and len(worse["reasons"]) == 1 and "endpoint B" in worse["reasons"][0]
    assert calibration_check(5000, (0.10, 0.12), (0.1005, 0.12))["reliable"]  # within the 1 % tolerance
