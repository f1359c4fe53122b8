"""The validated adoption policy: a device takes the share of a global model that fits its own recent readings
best (`models.federation.validated_blend`, `DeviceDetector.adopt_global` under `adoption_policy="validated"`), label-free."""
import math

import numpy as np
import pytest

from config import load_config
from models.detector import DeviceDetector
from models.federation import choose_blend_weight, subspace_moments, validated_blend

METRICS = ["cpu", "mem", "disk", "net"]
CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0)


def readings(n, seed=0, flip=False):
    """Correlated metrics with a cycle; `flip`: another device whose metrics relate the other way round."""
    rng = np.random.default_rng(seed)
    base = 0.5 + 0.2 * np.sin(np.arange(n) / 10.0)
    other = 1.0 - base if not flip else base
    X = np.stack([base, 0.8 * base + 0.1, other, 0.3 + 0.1 * np.cos(np.arange(n) / 7.0)], axis=1)
    return X + rng.normal(0, 0.01, size=X.shape)


def make(**overrides):
    return DeviceDetector.create(METRICS, load_config(env={}), **{"kind": "subspace", "warmup": 100,
                                                                  "adoption_policy": "validated", **overrides})


def times(det, n):
    """Event times of the next `n` readings of `det`, 5 minutes apart."""
    return (det.n_seen + np.arange(n)) * 300_000


def feed(det, X, batch=16):
    for i in range(0, len(X), batch):
        det.process_many(X[i:i + batch], ts=times(det, len(X[i:i + batch])))
    return det


def test_choose_blend_weight_takes_the_lowest_error_and_ties_go_to_the_smaller_share():
    assert choose_blend_weight(CANDIDATES, [5.0, 4.0, 3.0, 3.5, 9.0]) == 0.5
    assert choose_blend_weight(CANDIDATES, [2.0, 2.0, 1.0, 1.0 + 1e-9, 1.0]) == 0.5
    assert choose_blend_weight(CANDIDATES, [1.0] * 5) == 0.0
    assert choose_blend_weight(CANDIDATES, [math.nan, math.inf, 3.0, 2.0, math.nan]) == 0.75
    assert choose_blend_weight(CANDIDATES, [math.nan] * 5) == 0.0
    with pytest.raises(ValueError, match="candidates"):
        choose_blend_weight(CANDIDATES, [1.0])


def test_validated_blend_picks_the_candidate_with_the_lowest_validation_error_on_synthetic_data():
    """Linear-Gaussian devices: the validation data are drawn from a distribution whose mean is 30 % of the
    way from the local model's to the global one's; the squared distance of the blended mean to that point
    is smallest at the candidate 0.25, and the rule must return it, its weights and every error."""
    rng = np.random.default_rng(3)
    d, r = 6, 2
    factor = rng.normal(size=(d, r)).astype(np.float32)
    local = [factor, np.zeros(d, np.float32), (factor ** 2).sum(axis=1) + 0.1]
    global_weights = [factor, np.full(d, 4.0, np.float32), (factor ** 2).sum(axis=1) + 0.1]
    target = 0.3 * 4.0 + rng.normal(0, 0.05, size=(200, d))

    def error(weights):
        return float(np.mean((target - weights[1]) ** 2))

    chosen, weights, errors = validated_blend(local, global_weights, CANDIDATES, error, "subspace/6/r2")
    assert chosen == 0.25
    assert int(np.argmin(errors)) == 1 and len(errors) == len(CANDIDATES)
    np.testing.assert_allclose(weights[1], 1.0, atol=1e-5)   # mean of the 0.25 blend: 0.75·0 + 0.25·4
    same, kept, _ = validated_blend(local, global_weights, (0.0, 1.0), lambda w: float(np.abs(w[1]).sum()),
                                    "subspace/6/r2")
    assert same == 0.0 and all(k is w for k, w in zip(kept, local))   # keeping its own model: untouched
    with pytest.raises(ValueError, match="candidates"):
        validated_blend(local, global_weights, (0.0, 1.5), error, "subspace/6/r2")


def test_detector_takes_the_global_model_that_fits_its_recent_readings_and_refuses_one_that_does_not():
    """A device that learned a changed relation long ago but now sees the old one again: the global model of
    devices with the old relation fits its recent readings better, so it takes some of it; a global model of
    an unrelated relation it does not take."""
    fleet = feed(make(), readings(1500, seed=1))                    # the relation the device sees now
    stranger = feed(make(), readings(1500, seed=2, flip=True))     # another relation
    device = feed(make(), np.vstack([readings(1500, seed=3, flip=True), readings(200, seed=4)]))
    assert device.adopt_global(stranger.get_weights(), version=1) == 0.0
    before = device.get_weights()
    share = device.adopt_global(fleet.get_weights(), version=2)
    assert share > 0.0 and device.global_version == 2
    assert not np.allclose(device.get_weights()[0], before[0])  # its covariance factor moved towards the fleet
    assert device.model.global_share == pytest.approx(share, abs=0.05)


def test_identical_local_and_global_models_change_nothing():
    det = feed(make(), readings(800))
    state = det.to_bytes()
    local = det.get_weights()
    assert det.adopt_global([w.copy() for w in local], version=1) == 0.0
    for after, before in zip(det.get_weights(), local):
        np.testing.assert_array_equal(after, before)
    assert det.model.global_share == 0.0 and det.global_version == 1
    restored = DeviceDetector.from_bytes(state)
    X = readings(64, seed=9)
    np.testing.assert_array_equal(det.score_many(X, ts=times(det, 64)), restored.score_many(X, ts=times(det, 64)))


def test_validated_adoption_is_deterministic_and_survives_a_restart():
    global_weights = feed(make(), readings(900, seed=5, flip=True)).get_weights()
    runs = []
    for _ in range(2):
        det = feed(make(), readings(900, seed=6))
        det = DeviceDetector.from_bytes(det.to_bytes())   # the held readings are part of the state
        share = det.adopt_global(global_weights, version=1)
        runs.append((share, det.get_weights(), det.to_bytes()))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][2] == runs[1][2]


def test_without_held_readings_the_validated_policy_blends_the_configured_share():
    det = feed(make(adoption_readings=64), readings(20))            # fewer than half the validation readings
    other = feed(make(), readings(600, seed=7, flip=True))
    local_mean = subspace_moments(det.get_weights())[0]
    assert det.adopt_global(other.get_weights(), version=1) == 0.5
    np.testing.assert_allclose(subspace_moments(det.get_weights())[0],
                               0.5 * local_mean + 0.5 * subspace_moments(other.get_weights())[0], atol=1e-5)


def test_readings_are_held_only_under_the_validated_policy():
    assert feed(make(adoption_policy="blend"), readings(200)).held_readings.shape == (0, len(METRICS) + 2)
    held = feed(make(adoption_readings=32), readings(200)).held_readings
    assert held.dtype == np.float32 and held.shape == (32 + 4, len(METRICS) + 2)   # + 4 lags; + the time of day
    with pytest.raises(ValueError, match="global_policy"):
        make(adoption_policy="average")


def test_states_of_the_previous_format_restore_with_no_held_readings():
    """Checkpoints written before the held readings existed (format /2) still restore."""
    from models.serialization import dumps, loads
    det = feed(make(adoption_policy="blend"), readings(300))
    arrays, meta = loads(det.to_bytes())
    settings = {k: v for k, v in meta["settings"].items() if not k.startswith(("adoption_", "stuck_"))}
    old = dumps(arrays[:8] + arrays[11:], {**meta, "architecture": "flead.device-detector/2", "settings": settings})
    restored = DeviceDetector.from_bytes(old)
    assert restored.n_seen == 300 and restored.held_readings.shape == (0, len(restored.input_names))
    X = readings(32, seed=11)
    np.testing.assert_array_equal(restored.score_many(X, ts=times(det, 32)), det.score_many(X, ts=times(det, 32)))


def test_prior_policy_gives_the_global_model_the_weight_of_a_fixed_number_of_readings():
    """MAP adaptation: share prior / (prior + readings learned): a young device takes much of the fleet's model, a
    device with much data of its own little; prior 0 keeps its own model."""
    fleet = feed(make(), readings(1500, seed=12, flip=True)).get_weights()
    young = feed(make(adoption_policy="prior", adoption_prior_readings=500), readings(500))
    old = feed(make(adoption_policy="prior", adoption_prior_readings=500), readings(4500))
    learned = young.model.weight, old.model.weight  # 500 and 4,500 readings as the model weighs them (forgetting)
    assert 450 < learned[0] <= 500 and 3000 < learned[1] <= 4500
    shares = [500 / (500 + weight) for weight in learned]  # 0.5 and 0.1 without forgetting
    assert young.adopt_global(fleet, version=1) == pytest.approx(shares[0])
    assert old.adopt_global(fleet, version=1) == pytest.approx(shares[1])
    assert young.model.global_share == pytest.approx(shares[0]) and old.model.global_share == pytest.approx(shares[1])
    before = young.get_weights()
    assert young.adopt_global(fleet, version=2) == 0.0   # nothing learned since: nothing missing
    none = feed(make(adoption_policy="prior", adoption_prior_readings=0), readings(500))
    before_none = none.get_weights()
    assert none.adopt_global(fleet, version=1) == 0.0
    for det, weights in ((young, before), (none, before_none)):
        for a, b in zip(det.get_weights(), weights):
            np.testing.assert_array_equal(a, b)


def test_a_device_blends_given_its_time_of_day_only_when_configured():
    """`adoption_given_time_of_day` routes a subspace device's blend through `blend_subspace_given` with its
    time-of-day inputs (and their lags) as the covariates; off, or without the time of day, the plain blend."""
    from models.federation import blend_weights

    other = feed(make(adoption_policy="blend"), readings(600, seed=7, flip=True)).get_weights()
    for given in (True, False):
        det = feed(make(adoption_policy="blend", adoption_given_time_of_day=given), readings(600))
        local = det.get_weights()
        mask = det._covariate_inputs()
        assert (mask is not None) == given
        if given:   # the sine and cosine of the day, at every lag of the window
            assert mask.sum() == 2 * det.settings.subspace_window and mask.shape == (det.features.n_features,)
        det.adopt_global(other, version=1)
        expected = blend_weights(local, other, 0.5, det.architecture, mask)
        np.testing.assert_allclose(det.get_weights()[1], expected[1], atol=1e-6)
        np.testing.assert_allclose(det.get_weights()[2], expected[2], rtol=1e-5)
    assert make(adoption_given_time_of_day=True, time_of_day=False)._covariate_inputs() is None
    assert "adoption_given_time_of_day" in det.settings.to_dict()
