"""Online thresholds: target false-alarm rate on Gaussian noise, state round trip."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.thresholds import (MIN_SCORES, PotThreshold, QuantileThreshold, SigmaThreshold, _RecentScores,
                               make_threshold, threshold_from_arrays, valley_order_statistic)

N = 20000
Q = 0.01
TOLERANCE = (0.005, 0.02)   # accepted empirical false-alarm rate for target Q
Z_99 = 2.3263                # standard normal 0.99 quantile: SigmaThreshold's k for Q on Gaussian scores


def streamed_alarm_rate(threshold, scores, batch=16):
    """Score-then-update in micro-batches, as the detector does; rate over scores once the cut exists."""
    alarms = judged = 0
    for start in range(0, scores.shape[0], batch):
        chunk = scores[start:start + batch]
        if np.isfinite(threshold.threshold):
            alarms += int((chunk > threshold.threshold).sum())
            judged += chunk.shape[0]
        threshold.update_many(chunk)
    return alarms / judged


@pytest.mark.parametrize("threshold", [SigmaThreshold(Z_99), QuantileThreshold(Q), PotThreshold(Q)],
                         ids=["sigma", "quantile", "pot"])
def test_target_false_alarm_rate_on_gaussian_noise(threshold):
    scores = np.random.default_rng(11).normal(size=N)
    rate = streamed_alarm_rate(threshold, scores)
    assert TOLERANCE[0] <= rate <= TOLERANCE[1], rate


def test_pot_on_heavy_tailed_scores():
    """Reconstruction errors are skewed: POT should still meet the target on squared Gaussian scores."""
    scores = np.random.default_rng(12).normal(size=(N, 4)) ** 2
    rate = streamed_alarm_rate(PotThreshold(Q), scores.mean(axis=1))
    assert TOLERANCE[0] <= rate <= TOLERANCE[1], rate


def test_no_threshold_before_min_scores_and_nan_ignored():
    t = QuantileThreshold(Q)
    t.update_many(np.arange(MIN_SCORES - 1.0))
    t.update_one(np.nan)
    assert t.threshold == np.inf
    t.update_one(5.0)
    assert np.isfinite(t.threshold)


@pytest.mark.parametrize("kind", ["sigma", "quantile", "pot"])
def test_state_round_trip(kind):
    t = make_threshold({"kind": kind, "target_false_alarm_rate": Q, "sigma_k": 3.0, "history": 500})
    scores = np.random.default_rng(0).exponential(size=1300)
    t.update_many(scores[:1000])
    restored = threshold_from_arrays(t.to_arrays())
    assert type(restored) is type(t) and restored.threshold == t.threshold
    t.update_many(scores[1000:])
    restored.update_many(scores[1000:])
    assert restored.threshold == t.threshold


def test_make_threshold_reads_config_section():
    from config import load_config
    t = make_threshold(load_config(env={}).threshold)
    assert isinstance(t, QuantileThreshold) and t.q == pytest.approx(0.01)
    with pytest.raises(ValueError, match="threshold.kind"):
        make_threshold({"kind": "magic"})


def test_calibration_p_values_and_robust_z():
    t = QuantileThreshold(Q, history=1000)
    assert np.isnan(t.p_values(np.array([1.0]))).all() and np.isnan(t.robust_z(np.array([1.0]))).all()
    calibration = np.random.default_rng(3).normal(size=1000)
    t.update_many(calibration)
    p = t.p_values(np.array([-10.0, 0.0, 10.0]))
    assert p[0] == 1.0 and p[2] == pytest.approx(1 / 1001) and 0.4 < p[1] < 0.6
    fresh = np.random.default_rng(4).normal(size=20000)   # conformal: P(p <= a) <= a on exchangeable scores
    for a in (0.01, 0.05, 0.2):
        assert np.mean(t.p_values(fresh) <= a) <= a * 1.15
    assert abs(t.robust_z(np.array([0.0]))[0]) < 0.1 and 1.8 < t.robust_z(np.array([2.0]))[0] < 2.2


def test_reset_forgets_and_history_is_float32():
    t = QuantileThreshold(Q, history=100)
    t.update_many(np.arange(200.0))
    head, scores = t.to_arrays()
    assert scores.dtype == np.float32 and scores.shape == (100,) and np.isfinite(t.threshold)
    t.reset()
    assert t.threshold == np.inf and t.history.count == 0 and not t.calibrated


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.lists(st.integers(1, 30), min_size=1, max_size=12), st.integers(0, 99),
       st.booleans())
def test_recent_scores_stay_in_order_as_scores_come_and_go(capacity, batches, seed, ties):
    """The history kept in order (no sort per batch) equals sorting the ring buffer's scores, whatever the batch
    sizes, with scores evicted, repeated values (ties) and non-finite scores (never kept)."""
    rng = np.random.default_rng(seed)
    history = _RecentScores(capacity)
    for size in batches:
        scores = rng.integers(0, 4, size).astype(float) if ties else rng.normal(size=size)
        scores[rng.random(size) < 0.1] = np.nan
        history.extend(scores)
        assert np.array_equal(history.ordered, np.sort(history.values()))
    history.clear()
    assert history.ordered.shape == (0,)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=80), st.data())
def test_valley_order_statistic_equals_partition(values, data):
    """On the distances of sorted scores to any centre (a valley), the k-th smallest equals np.partition's, and
    the robust z uses it exactly (same value as before it stopped partitioning)."""
    ordered = np.sort(np.array(values))
    centre = data.draw(st.floats(-1e6, 1e6))
    deviations = np.abs(ordered - centre)
    k = data.draw(st.integers(0, ordered.shape[0] - 1))
    assert valley_order_statistic(deviations, k) == np.partition(deviations, k)[k]
