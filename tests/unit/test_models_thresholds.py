"""Online thresholds: target false-alarm rate on Gaussian noise, state round trip."""
import numpy as np
import pytest

from models.thresholds import (MIN_SCORES, PotThreshold, QuantileThreshold, SigmaThreshold, make_threshold,
                               threshold_from_array)

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
    restored = threshold_from_array(t.to_array())
    assert type(restored) is type(t) and restored.threshold == t.threshold
    t.update_many(scores[1000:])
    restored.update_many(scores[1000:])
    assert restored.threshold == t.threshold


def test_make_threshold_reads_config_section():
    from config import load_config
    t = make_threshold(load_config(env={}).threshold)
    assert isinstance(t, PotThreshold) and t.q == pytest.approx(0.01)
    with pytest.raises(ValueError, match="threshold.kind"):
        make_threshold({"kind": "magic"})
