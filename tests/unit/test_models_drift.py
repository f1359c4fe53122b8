"""DriftMonitor and ResidualScale: label-free drift decisions and the per-input normalisers."""
import math

import numpy as np
import pytest

from models.drift import DriftMonitor, binomial_tail, least_significant_count
from models.residuals import ResidualScale, metric_shares


def test_binomial_tail_matches_a_direct_sum():
    n, p = 30, 0.07
    direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(6, n + 1))
    assert binomial_tail(n, p, 6) == pytest.approx(direct, rel=1e-12)
    assert binomial_tail(n, p, 0) == 1.0 and binomial_tail(n, p, n + 1) == 0.0
    k = least_significant_count(72, 0.01, 1e-3)
    assert binomial_tail(72, 0.01, k) < 1e-3 <= binomial_tail(72, 0.01, k - 1)


def test_monitor_ignores_the_target_rate_and_an_incident_but_not_a_new_normal():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(target_rate=0.01, block_readings=72, blocks=4, alpha=1e-3)
    assert monitor.update(rng.random(20_000) < 0.01) is None        # the target rate: never
    incident = np.zeros(1000, dtype=bool)
    incident[100:300] = True                                        # 200 flagged readings in a row
    assert monitor.update(incident) is None                         # shorter than the window: an incident
    at, rate = monitor.update(rng.random(1000) < 0.3)               # a lasting 30 %: drift
    assert at < 4 * 72 + 72 and rate > 0.2 and monitor.n_events == 1
    clone = DriftMonitor.from_array(monitor.to_array())
    assert clone.to_array().tolist() == monitor.to_array().tolist()
    with pytest.raises(ValueError, match="drift"):
        DriftMonitor(target_rate=0.0)


def test_residual_scale_is_an_exponentially_weighted_rms_with_a_floor():
    scale = ResidualScale(half_life=0, floor=0.5)
    E = np.array([[4.0, 0.01], [16.0, 0.01]])
    scale.learn_many(E)
    np.testing.assert_allclose(scale.scales, [np.sqrt(10.0), 0.5])
    forgetful = ResidualScale(half_life=1, floor=0.0)
    forgetful.learn_many(E)   # the newest weighs 1, the older 1/2
    np.testing.assert_allclose(forgetful.mean_square, [(0.5 * 4 + 16) / 1.5, 0.01])
    clone = ResidualScale.from_array(forgetful.to_array())
    np.testing.assert_array_equal(clone.score_many(E), forgetful.score_many(E))


def test_cap_shrinks_rows_for_the_slow_tracker_only():
    scale = ResidualScale(half_life=0, floor=0.0, recent_half_life=0)
    scale.learn_many(np.array([[1.0], [100.0]]), cap=np.array([1.0, 0.04]))   # the second counts as 4, not 100
    np.testing.assert_allclose(scale.mean_square, [2.5])
    np.testing.assert_allclose(scale.recent_mean_square, [50.5])             # re-baselining sees it as it was


def test_rebaseline_takes_the_recent_scales():
    scale = ResidualScale(half_life=0, floor=0.0, recent_half_life=10)
    scale.learn_many(np.ones((1000, 2)))
    scale.learn_many(np.full((100, 2), 9.0))           # residuals three times larger lately
    assert scale.scales[0] < 1.5
    scale.rebaseline(max_weight=50)
    assert scale.scales[0] == pytest.approx(3.0, rel=0.01) and scale.weight <= 50


def test_metric_shares_fold_window_blocks_back_to_metrics():
    normalised = np.array([[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])   # 2 blocks (lags) x 2 metrics
    np.testing.assert_allclose(metric_shares(normalised, blocks=2), [[1.0, 0.0], [0.0, 0.0]])
