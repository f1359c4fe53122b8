"""DeviceDetector: the contract of docs/contracts.md, for every kind of model."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from config import load_config
from models.detector import DeviceDetector
from models.features import MAX_ABS_INPUT, NonFiniteMetricError
from models.serialization import SerializationError, loads
from models.scaler import RunningScaler

METRICS = ["cpu", "mem", "disk", "net"]
WARMUP = 100
FIVE_MINUTES_MS = 300_000
KINDS = {"subspace": {"kind": "subspace"}, "ae": {"kind": "ae"},
         "lstm_ae": {"kind": "lstm_ae", "window": 6, "lstm_hidden": 4}}


def normal_readings(n, seed=0):
    """Correlated metrics in [0, 1] with a daily-like cycle: what a model can learn."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 0.5 + 0.2 * np.sin(t / 10.0)
    X = np.stack([base, 0.8 * base + 0.1, 1.0 - base, 0.3 + 0.1 * np.cos(t / 7.0)], axis=1)
    return X + rng.normal(0, 0.01, size=X.shape)


def adoption(det, policy, blend_weight=0.5):
    """`det` reconfigured to another adoption policy (as a job with a changed configuration does)."""
    det.reconfigure(dataclasses.replace(det.settings, adoption_policy=policy, adoption_blend_weight=blend_weight))
    return det


def make(**overrides):
    """A small detector; without the time of day unless asked (readings here have no times; its own tests give
    them, at the end)."""
    settings_ = dict(kind="ae", hidden=[8, 3, 8], warmup=WARMUP, learning_rate=0.01, seed=1, time_of_day=False)
    settings_.update(overrides)
    return DeviceDetector.create(METRICS, load_config(env={}), **settings_)


def feed(det, X, batch=16, start=0):
    """`X` in micro-batches, reading i (from `start`) at i × 5 minutes."""
    seqs = np.arange(start, start + len(X))
    return [det.process_many(X[i:i + batch], seqs=seqs[i:i + batch], ts=seqs[i:i + batch] * FIVE_MINUTES_MS)
            for i in range(0, X.shape[0], batch)]


def test_create_reads_config_and_overrides():
    det = DeviceDetector.create(METRICS, load_config(env={}))
    assert det.settings.kind == "subspace" and det.settings.subspace_window == 5
    assert det.settings.explained_variance == pytest.approx(0.9) and det.settings.feature_lags == (1, 2, 3, 4)
    assert det.input_names == METRICS + ["time_of_day:sin", "time_of_day:cos"]  # model.features.time_of_day
    assert det.features.n_features == 5 * (len(METRICS) + 2) and det.architecture == "subspace/30/r16"
    assert det.settings.threshold_kind == "quantile" and det.settings.top_k_metrics == 3
    assert det.n_seen == 0 and det.model_version == 0 and det.global_version == 0
    assert make().settings.hidden == (8, 3, 8) and make().settings.feature_lags == ()
    assert DeviceDetector.create(METRICS, load_config(env={}), hidden=[2]).settings.hidden == (2,)
    with pytest.raises(ValueError, match="unknown detector setting"):
        make(hiden=[3])
    with pytest.raises(ValueError, match="model.kind"):
        make(kind="forest")


@pytest.mark.parametrize("kind", KINDS)
def test_no_alerts_during_warmup_and_shapes(kind):
    det = make(**KINDS[kind])
    results = feed(det, normal_readings(WARMUP))
    assert not any(r.is_anomaly.any() for r in results)
    r = results[0]
    assert r.scores.shape == r.thresholds.shape == r.is_anomaly.shape == r.p_values.shape == (16,)
    assert np.isnan(r.p_values).all() and np.isnan(r.z_scores).all()        # null during warm-up
    assert r.metric_shares.shape == (16, len(METRICS)) and (r.incident_starts == -1).all()
    assert len(r.top_metrics) == 16 and len(r.top_metrics[0]) == 3
    assert det.n_seen == WARMUP


def test_warm_up_grows_with_the_models_inputs():
    """A model of many inputs settles later: no alert before `warmup_per_input` readings per input (a default
    detector over 40 metrics has 210 inputs, the time of day's included: 1,050 readings), nor than `warmup`; with 0
    per input (a state from before the setting, until reconfigured) `warmup` alone."""
    many = [f"m{i}" for i in range(40)]
    cfg = load_config(env={})
    det = DeviceDetector.create(many, cfg, warmup=100)
    assert det.settings.warmup_per_input == cfg.threshold.warmup_per_input == 5
    assert det.warmup_readings == 5 * 5 * (len(many) + 2) == 1050
    assert DeviceDetector.create(many, cfg, warmup=2000).warmup_readings == 2000
    assert DeviceDetector.create(many, cfg, warmup=100, warmup_per_input=0).warmup_readings == 100
    rng = np.random.default_rng(3)
    X = rng.normal(0.5, 0.1, size=(1090, len(many)))
    X[1040:1090, :4] += 3.0  # an anomaly straddling the end of the warm-up
    results = feed(det, X)
    flags = np.concatenate([r.is_anomaly for r in results])
    assert not flags[:1050].any() and flags[1050:].any()


@pytest.mark.parametrize("kind", ["subspace", "ae"])
def test_scores_are_calibrated_after_learning(kind):
    det = make(**KINDS[kind])
    results = feed(det, normal_readings(1600))
    late = np.concatenate([r.scores for r in results[-20:]])
    assert 0.05 < np.median(late) < 3.0       # normalised residuals: order 1 on normal data
    alarm_rate = np.mean(np.concatenate([r.is_anomaly for r in results[20:]]))
    assert alarm_rate < 0.05
    p = np.concatenate([r.p_values for r in results[-20:]])
    assert np.all((p > 0) & (p <= 1)) and 0.3 < np.mean(p) < 0.7   # conformal p-values: about uniform


@pytest.mark.parametrize("kind", KINDS)
def test_spike_is_flagged_with_the_right_top_metric(kind):
    det = make(**KINDS[kind])
    X = normal_readings(1200)
    feed(det, X)
    spike = normal_readings(1201)[-1:].copy()
    spike[0, 2] += 0.6  # disk jumps while its peers stay put
    res = det.process_many(spike, seqs=[1200], ts=[5_000])
    assert res.is_anomaly[0], (res.scores, res.thresholds)
    metric, share = res.top_metrics[0][0]
    if kind == "ae":  # the network explains part of the jump by moving its latent factor, so cpu and mem (driven
        #               by the same factor, with smaller typical residuals) share the blame
        assert "disk" in [m for m, _ in res.top_metrics[0]]
    else:
        assert metric == "disk" and share > 1.2 / len(METRICS)  # above an even split
    assert sum(s for _, s in res.top_metrics[0]) <= 1.0 + 1e-12
    assert res.p_values[0] < 0.01 and res.z_scores[0] > 3
    start = int(res.incident_starts[0])   # the spike's own incident, or one a recent flag opened
    assert 1200 - det.incidents.gap_readings - 1 <= start <= 1200
    [incident] = [i for i in res.incidents if i.start_seq == start]
    assert incident.status == "open" and incident.end_seq == 1200 and incident.end_ts == 5_000
    assert incident.peak_ratio >= res.scores[0] / res.thresholds[0] - 1e-12


@pytest.mark.parametrize("overrides", [KINDS["subspace"], KINDS["ae"], KINDS["lstm_ae"],
                                       {"kind": "ae", "threshold_kind": "pot", "rolling_windows": [4], "lags": [1],
                                        "rate_of_change": True, "optimizer": "sgd"}])
def test_to_bytes_round_trip_gives_identical_results(overrides):
    det = make(**overrides)
    X = normal_readings(400)
    X[350, 1] += 0.5
    feed(det, X[:300])
    det.snapshot()
    clone = DeviceDetector.from_bytes(det.to_bytes())
    assert (clone.n_seen, clone.model_version, clone.loss) == (det.n_seen, det.model_version, det.loss)
    for a, b in zip(feed(det, X[300:], start=300), feed(clone, X[300:], start=300)):
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.thresholds, b.thresholds)
        np.testing.assert_array_equal(a.p_values, b.p_values)
        np.testing.assert_array_equal(a.incident_starts, b.incident_starts)
        assert a.top_metrics == b.top_metrics and a.incidents == b.incidents
    assert det.to_bytes() == clone.to_bytes()


def test_settings_travel_as_plain_json_values_and_come_back_equal():
    settings_ = make(kind="ae", rolling_windows=[4, 8], lags=[1, 2]).settings
    values = settings_.to_dict()
    assert list(values) == [f.name for f in dataclasses.fields(settings_)]
    assert values == {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings_).items()}
    assert all(type(v) is not tuple for v in values.values())  # JSON has no tuples: as lists, as the blob holds them
    assert type(settings_).from_dict(values) == settings_


def test_from_bytes_rejects_tampering_and_other_blobs():
    det = make()
    feed(det, normal_readings(50))
    blob = bytearray(det.to_bytes())
    blob[-3] ^= 0xFF
    with pytest.raises(SerializationError):
        DeviceDetector.from_bytes(bytes(blob))
    with pytest.raises(SerializationError, match="not a device detector"):
        DeviceDetector.from_bytes(det.snapshot()["weights"])


def test_snapshot_counts_samples_and_versions():
    det = make()
    feed(det, normal_readings(48))
    snap = det.snapshot()
    assert (snap["n_samples"], snap["version"], snap["global_version"]) == (48, 1, 0)
    weights, meta = loads(snap["weights"])
    assert meta["architecture"] == "dense_ae/4-8-3-8-4/tanh" and meta["model_version"] == 1
    for w, g in zip(weights, det.get_weights()):
        np.testing.assert_array_equal(w, g)
    feed(det, normal_readings(16))
    assert det.snapshot()["n_samples"] == 16 and det.model_version == 2


def test_subspace_snapshot_is_small_float32():
    det = make(kind="subspace")
    feed(det, normal_readings(200))
    weights, meta = loads(det.snapshot()["weights"])
    assert meta["architecture"] == "subspace/20/r16"
    assert [w.dtype.name for w in weights] == ["float32"] * 3
    assert [w.shape for w in weights] == [(20, 16), (20,), (20,)]


def test_adopt_global_replace_and_blend():
    det = make()
    feed(det, normal_readings(32))
    local = det.get_weights()
    global_weights = [np.ones_like(w) for w in local]
    blended = make()
    blended.set_weights(local)
    adoption(blended, "blend", 0.25).adopt_global(global_weights, 3)
    for b, w in zip(blended.get_weights(), local):
        np.testing.assert_allclose(b, 0.75 * w + 0.25)
    adoption(det, "replace").adopt_global(global_weights, 4)
    assert det.global_version == 4
    for w in det.get_weights():
        np.testing.assert_array_equal(w, 1.0)
    with pytest.raises(ValueError, match="weight array"):
        det.adopt_global(global_weights[:-1] + [np.ones(7)], version=5)
    with pytest.raises(ValueError, match="global_policy"):
        adoption(det, "average")
    with pytest.raises(ValueError, match="blend_weight"):
        adoption(det, "blend", 1.5)
    with pytest.raises(ValueError, match="blend_weight"):
        make(adoption_blend_weight=-0.1)
    assert det.global_version == 4   # refused: nothing taken


def test_reconfigure_takes_a_changed_configuration_and_keeps_what_was_learned():
    """A device restored after its configuration changed: the tunable settings apply (its threshold refits on the
    scores it holds at the new rate, drift and incidents retune, the model and residual scales take their new
    memory), what shapes the model stays, the state keeps the new settings, and doing it again changes nothing."""
    det = make(kind="subspace", threshold_kind="quantile", target_false_alarm_rate=0.01, subspace_half_life=0,
               residual_half_life=0)
    feed(det, normal_readings(600))
    cut, held, weights = det.threshold.threshold, det.threshold.history.count, det.get_weights()
    wanted = DeviceDetector.create(METRICS, load_config(env={}), kind="ae", window=9, threshold_kind="quantile",
                                   target_false_alarm_rate=0.2, drift_alpha=0.01, incident_gap_readings=3,
                                   top_k_metrics=2, adoption_policy="validated", subspace_half_life=3000,
                                   residual_half_life=4000).settings
    assert det.reconfigure(wanted)
    assert (det.model.half_life, det.residual_scale.half_life) == (3000, 4000) and det.model.forgetting < 1
    assert det.settings.target_false_alarm_rate == 0.2 and det.settings.kind == "subspace"   # model kept
    assert det.settings.window == make().settings.window and det.settings.tunable() == wanted.tunable()
    assert det.threshold.history.count == held and det.threshold.threshold < cut   # same scores, higher rate
    assert det.drift.min_flags > make().drift.min_flags   # a 20 % rate needs more flags per block
    assert (det.incidents.gap_readings, det.incidents.top_k) == (3, 2)
    for after, before in zip(det.get_weights(), weights):
        np.testing.assert_array_equal(after, before)
    assert not det.reconfigure(wanted)
    feed(det, normal_readings(50, seed=2), start=600)
    assert det.held_readings.shape[0] > 0   # now under the validated policy: it holds readings
    restored = DeviceDetector.from_bytes(det.to_bytes())
    assert restored.settings == det.settings and restored.threshold.threshold == det.threshold.threshold
    assert (restored.model.half_life, restored.residual_scale.half_life) == (3000, 4000)
    with pytest.raises(ValueError, match="global_policy"):
        det.reconfigure(dataclasses.replace(wanted, adoption_policy="average"))
    assert det.settings.adoption_policy == "validated"   # refused: nothing changed


def test_subspace_blend_mixes_covariances_and_does_not_compound():
    from models.federation import subspace_moments
    det = make(kind="subspace")
    feed(det, normal_readings(600))
    other = make(kind="subspace")
    feed(other, normal_readings(600, seed=5)[:, ::-1].copy())   # another device: metrics reversed
    local_mean, local_C = subspace_moments(det.get_weights())
    global_weights = other.get_weights()
    global_mean, global_C = subspace_moments(global_weights)
    adoption(det, "blend").adopt_global(global_weights, 1)
    mean, C = subspace_moments(det.get_weights())
    np.testing.assert_allclose(mean, 0.5 * local_mean + 0.5 * global_mean, atol=1e-5)
    mixture = 0.5 * local_C + 0.5 * global_C + 0.25 * np.outer(local_mean - global_mean, local_mean - global_mean)
    np.testing.assert_allclose(np.diag(C), np.diag(mixture), atol=1e-4)   # the diagonal is exact
    assert det.model.global_share == 0.5
    adoption(det, "blend").adopt_global(global_weights, 2)   # no readings since: no change
    np.testing.assert_allclose(det.get_weights()[1], mean, atol=1e-6)
    feed(det, normal_readings(500, seed=1))
    assert 0.2 < det.model.global_share < 0.5      # the global part decays as the device learns ...
    adoption(det, "blend").adopt_global(global_weights, 3)
    assert det.model.global_share == 0.5           # ... and only the missing part is blended in again


@pytest.mark.parametrize("kind", KINDS)
def test_nan_impute_is_counted_and_reject_raises(kind):
    X = normal_readings(32)
    X[3, 1] = np.nan
    X[9, 0] = np.inf
    det = make(**KINDS[kind])
    results = feed(det, X)
    assert results[0].n_imputed == 2 and det.features.n_imputed == 2
    assert np.isfinite(results[0].scores).all()
    strict = make(nan_policy="reject", **KINDS[kind])
    with pytest.raises(NonFiniteMetricError, match="'mem'"):
        strict.process_many(X[:16])
    assert strict.n_seen == 0


@pytest.mark.parametrize("kind", KINDS)
def test_score_many_changes_no_state(kind):
    det = make(**KINDS[kind])
    X = normal_readings(64)
    feed(det, X[:48])
    before = det.to_bytes()
    det.score_many(X[48:])
    assert det.to_bytes() == before


def test_wrong_number_of_metrics_is_an_error():
    with pytest.raises(ValueError, match="expected 4 metrics"):
        make().process_many(np.zeros((2, 3)))


@pytest.mark.parametrize("overrides", [KINDS["subspace"], KINDS["ae"],
                                       {"kind": "ae", "rolling_windows": [4], "lags": [1], "rate_of_change": True}])
def test_process_many_is_score_many_then_learn_many(overrides):
    X = normal_readings(400)
    X[5, 1] = np.nan
    X[300:310, 2] += 0.5
    fused, split = make(**overrides), make(**overrides)
    for i in range(0, 400, 16):
        result = fused.process_many(X[i:i + 16])
        scores = split.score_many(X[i:i + 16])
        split.learn_many(X[i:i + 16])
        np.testing.assert_array_equal(result.scores, scores)
    assert fused.to_bytes() == split.to_bytes()


def test_top_metrics_sum_derived_features_and_break_ties_in_order():
    det = make(rolling_windows=[3])  # 3 feature blocks per metric
    errors = np.random.default_rng(2).random((5, 3 * len(METRICS)))
    per_metric = errors.reshape(5, 3, len(METRICS)).sum(axis=1)
    shares = per_metric / per_metric.sum(axis=1, keepdims=True)
    expected = [sorted(((METRICS[j], shares[i, j]) for j in range(len(METRICS))), key=lambda p: -p[1])[:3]
                for i in range(5)]
    assert det.top_metrics(errors) == expected
    assert det.top_metrics(np.zeros((1, 3 * len(METRICS)))) == [[]]  # no residual: nothing to blame


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (6, 20), elements=st.floats(0, 1e3)))
def test_normalised_score_is_plain_mse_when_every_scale_is_one(squared_residuals):
    det = make(kind="subspace")
    det.residual_scale.learn_many(np.ones((1, 20)))      # every typical residual exactly 1
    assert (det.residual_scale.scales == 1.0).all()
    np.testing.assert_allclose(det.residual_scale.score_many(squared_residuals), squared_residuals.mean(axis=1))
    for inputs, scored in (("reading", slice(0, len(METRICS))), ("all", slice(None))):
        plain = make(kind="subspace", normalise_residuals=False, score_inputs=inputs)
        feed(plain, normal_readings(64))
        X = normal_readings(8, seed=3)
        errors = plain.model.feature_errors(plain.scaler.transform_many(plain.features.transform_many(X)))
        np.testing.assert_allclose(plain.score_many(X), errors[:, scored].mean(axis=1))


def test_a_spike_raises_its_own_score_not_the_next_readings():
    """The window's older readings shape the reconstruction, but only the reading's own values are scored: on
    readings independent in time, one anomalous reading is one flag, not one per reading whose window holds it.
    (Where readings are correlated in time, the model reconstructs a reading from its window, so a spike still
    disturbs the next few reconstructions.)"""
    rng = np.random.default_rng(4)
    load = rng.normal(0.5, 0.1, size=(1300, 1))
    X = np.hstack([load, 0.8 * load + 0.1, 1.0 - load, 0.5 * load]) + rng.normal(0, 0.01, size=(1300, 4))
    X[1250, 2] += 0.6
    for inputs, echo in (("reading", False), ("all", True)):
        det = make(kind="subspace", score_inputs=inputs)
        flags = np.concatenate([r.is_anomaly for r in feed(det, X)])
        assert flags[1250]
        assert flags[1251:1255].any() == echo, (inputs, flags[1248:1256])


def level_shift(n_before=1500, n_after=1500, seed=0):
    X = normal_readings(n_before + n_after, seed=seed)
    X[n_before:, 1] += 0.15    # mem settles 0.15 higher (a new normal: e.g. after a deploy)
    return X


def test_drift_rebaselines_and_brings_the_flag_rate_back_to_target():
    X = level_shift()
    det, stubborn = make(kind="subspace"), make(kind="subspace", drift_enabled=False, subspace_half_life=0,
                                                  residual_half_life=0)
    results, stubborn_results = feed(det, X), feed(stubborn, X)
    flags = np.concatenate([r.is_anomaly for r in results])
    events = [r.drift for r in results if r.drift is not None]
    assert len(events) >= 1 and det.n_drift_events == len(events)
    event = events[0]
    assert 1500 < event.seq < 1500 + 2 * det.drift.window and event.flag_rate > 0.07 and event.window == 288
    record = event.record_fields("dev-1", detected_at=7, model_version=det.model_version)
    assert record["event_id"] == f"dev-1:{event.seq}" and record["device_id"] == "dev-1"
    assert flags[200:1500].mean() < 0.03                   # before: about the target rate (0.01)
    assert flags[-1000:].mean() < 0.03                    # after re-baselining: back near the target
    stubborn_flags = np.concatenate([r.is_anomaly for r in stubborn_results])
    assert stubborn_flags[1500:2500].mean() > 2 * flags[event.seq + 200:event.seq + 1200].mean()


def test_learning_goes_on_during_incidents():
    """No gating: readings of an incident are learned (a change that lasts becomes normal); with
    `model.subspace.bounded_influence` each at most as much as a reading at the cut, so the model moves less."""
    X = level_shift()
    moved = {}
    for bounded in (False, True):
        det = make(kind="subspace", drift_enabled=False, bounded_influence=bounded)
        feed(det, X[:1500])
        level_before = learned_level(det, metric=1)
        feed(det, X[1500:2000], start=1500)
        moved[bounded] = learned_level(det, metric=1) - level_before
        assert det.n_seen == 2000
    assert 0.02 < moved[False] < 0.06   # ≈ 0.15 × 500 / 2000: the incident's readings count
    assert 0.001 < moved[True] < moved[False] / 2


def test_the_model_describes_what_it_learned_in_the_units_it_scores_in():
    """The scaler's mean and spread move with every batch (here: a trend and a growing spread); the model keeps
    what it learned in the scaler's current units, so its mean and covariance are those of every feature row
    learned, standardised as the next batch will be (before, the rows kept the units of their day: on ASD's
    training series the model's mean was off by ~0.05 standard deviations on every input)."""
    rng = np.random.default_rng(5)
    t = np.arange(1500)[:, None]
    X = 0.3 + 1e-4 * t + rng.normal(size=(1500, 4)) * (0.02 + 2e-5 * t) @ np.array(
        [[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, 0.3, 0.0], [0.0, 0.0, 1.0, 0.4], [0.0, 0.0, 0.0, 1.0]])
    det = make(kind="subspace", drift_enabled=False, subspace_rank=20, subspace_half_life=0)
    feed(det, X)
    rows = det.scaler.transform_many(make(kind="subspace").features.transform_and_learn_many(X))
    assert det.n_winsorised == 0
    np.testing.assert_allclose(det.model.mean, rows.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(det.model.covariance, np.cov(rows.T, bias=True), atol=1e-5)


def learned_level(det, metric: int) -> float:
    """The model's mean of one metric (over its lags), in the metric's own unit."""
    inputs = np.flatnonzero(det.features.metric_of_feature == metric)
    return float((det.scaler.mean[inputs] + det.model.mean[inputs] * det.scaler.std[inputs]).mean())


def test_an_early_spike_does_not_hide_the_next_and_flagged_readings_still_teach_the_scales():
    """Residual scales learn every reading, each at most as much as a reading at the cut (winsorised): a huge
    spike soon after warm-up leaves the scales nearly as they were, so it cannot hide the next one; and a lasting
    change that is flagged still raises the scales of the inputs it affects (no gate on flags)."""
    X = normal_readings(320, seed=3)
    det = make(kind="subspace", drift_enabled=False)
    feed(det, X[:304])
    before = det.residual_scale.scales.copy()
    X[305, 2] += 5.0    # a spike of hundreds of standard deviations: flagged with the 4 windows it is part of
    flags = np.concatenate([r.is_anomaly for r in feed(det, X[304:], start=304)])
    assert flags[1:6].all()
    assert (det.residual_scale.scales < 1.2 * before).all()   # a plain RMS: disk's scales x 20
    shifted = level_shift(n_before=600, n_after=600)
    det = make(kind="subspace", drift_enabled=False, subspace_half_life=0, residual_half_life=0)
    feed(det, shifted[:600])
    before = det.residual_scale.scales.copy()
    results = feed(det, shifted[600:], start=600)
    flags, scores = (np.concatenate([getattr(r, name) for r in results]) for name in ("is_anomaly", "scores"))
    mem = det.features.metric_of_feature == 1
    assert flags.mean() > 0.05 and (det.residual_scale.scales[mem] / before[mem]).mean() > 1.3
    assert np.median(scores[-100:]) < 0.3 * np.median(scores[:100])   # the change is being learned


def test_a_constant_metric_keeps_finite_scales():
    """A series constant for long (cut 0, most scores 0) and then changing keeps finite scores and scales."""
    det = make(kind="subspace")
    X = np.full((400, 4), 0.5)
    X[300:, 0] = np.linspace(0.5, 0.9, 100)
    scores = np.concatenate([r.scores for r in feed(det, X)])
    assert np.isfinite(scores).all() and np.isfinite(det.residual_scale.scales).all()


def test_an_empty_batch_is_a_clear_error():
    detector = DeviceDetector.create(["a", "b"], load_config(env={}), hidden=[4, 2, 4])
    with pytest.raises(ValueError, match="empty batch"):
        detector.process_many(np.zeros((0, 2)))


@pytest.mark.parametrize("extreme", [1e20, 1e100])
def test_one_absurd_value_neither_blinds_its_metric_nor_makes_scores_infinite(extreme):
    """Issue 14: one finite but absurd value (1e20) used to blow up the scale its metric is judged by, so a real
    anomaly there went unseen afterwards. What is learned is winsorised; what is scored stays finite."""
    rng = np.random.default_rng(0)
    X = rng.normal(0.5, 0.05, size=(2800, 5))
    X[2003, 2] = extreme
    X[2700, 2] = 1.5  # 20 standard deviations: a real anomaly on the same metric, later
    det = DeviceDetector.create([f"m{i}" for i in range(5)], load_config(env={}))
    results = feed(det, X)
    scores = np.concatenate([r.scores for r in results])
    flags = np.concatenate([r.is_anomaly for r in results])
    assert np.isfinite(scores).all() and flags[2003] and flags[2700]
    assert det.n_winsorised > 0
    assert np.isfinite(det.threshold.threshold) and det.threshold.threshold < 10 * np.median(scores[1000:2000])


def test_the_plausibility_bound_grows_with_the_evidence_and_caps_one_readings_influence():
    """Learning clips a value at max(10, sqrt(n)) standard deviations (n: readings learned): a genuine 30-sigma
    step after 2,000 readings is learned as it is; an absurd value at most doubles its input's variance."""
    rng = np.random.default_rng(2)
    X = rng.normal(0.5, 0.05, size=(2016, 3))
    det = DeviceDetector.create(["a", "b", "c"], load_config(env={}), subspace_window=1)
    feed(det, X[:2000])
    X[2000, 1] = 0.5 + 30 * det.scaler.std[1]
    feed(det, X[2000:2008], start=2000)
    assert det.n_winsorised == 0
    var = det.scaler.var[2]
    X[2008, 2] = 1e20
    feed(det, X[2008:2016], start=2008)
    assert det.n_winsorised == 1 and var < det.scaler.var[2] < 2.1 * var


def test_scaler_winsorises_only_after_enough_readings_and_rebaselines_to_a_weight():
    scaler = RunningScaler()
    X = np.random.default_rng(1).normal(0.0, 1.0, size=(100, 2))
    assert scaler.winsorise(X, 10.0, 30) == (X, 0)  # nothing learned yet
    scaler.learn_many(X)
    clipped, n = scaler.winsorise(np.array([[0.5, 1e20]]), 10.0, 30)
    assert n == 1 and clipped[0, 0] == 0.5 and clipped[0, 1] == pytest.approx(scaler.mean[1] + 10 * scaler.std[1])
    var = scaler.var.copy()
    scaler.rebaseline(20)
    assert scaler.n == 20 and np.allclose(scaler.var, var)


@pytest.mark.parametrize("scale, offset", [(1e9, 0.0), (1e-3, 0.0), (1.0, 273.15), (1e6, -1e3)],
                         ids=["bytes", "thousandths", "offset", "both"])
def test_scores_do_not_depend_on_the_unit_of_the_metrics(scale, offset):
    """No unit is assumed: the same telemetry in other units gives the same scores and flags, up to the rounding
    the online eigen-refresh amplifies early on (a 1e-12 offset moves scores as much), including for a metric that
    sits still and then moves (rounding alone: correlation 0.97-1.0, flags -10 %). Found on ASD scaled by
    10^-3..10^9 per metric: a metric's first move was judged in raw units (here at 1e9 before: correlation 0.73,
    32 % more flags)."""
    rng = np.random.default_rng(0)
    X = rng.normal(0.5, 0.05, size=(1200, 4))
    X[:700, 3] = 0.4  # constant for 700 readings, then it moves
    X[900, 1] += 0.5  # an anomaly
    runs = []
    for data in (X, X * scale + offset):
        det = DeviceDetector.create([f"m{i}" for i in range(4)], load_config(env={}))
        results = feed(det, data)
        runs.append((np.concatenate([r.scores for r in results]), np.concatenate([r.is_anomaly for r in results])))
    (scores, flags), (converted, converted_flags) = runs
    assert np.corrcoef(scores[250:], converted[250:])[0, 1] > 0.95
    assert abs(int(converted_flags.sum()) - int(flags.sum())) <= 0.2 * flags.sum()
    assert flags[900] and converted_flags[900]


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, (40, 3), elements=st.integers(-8, 8)), st.floats(-3, 9), st.floats(-1e3, 1e3))
def test_a_batch_is_standardised_the_same_in_any_unit(X, log_scale, offset_in_units):
    """`RunningScaler.transform_batch` is unit-free, constant features (never moved, then moving) included."""
    X = X / 8.0
    X[:30, 2] = 0.25  # constant over what is learned
    scale = 10.0 ** log_scale
    offset = offset_in_units * scale  # an offset of up to 1,000 of the metric's own units (°C to K, …)
    out = []
    for data in (X, X * scale + offset):
        scaler = RunningScaler()
        scaler.learn_many(data[:30])
        out.append(scaler.transform_batch(data[30:]))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["subspace", "ae"])
def test_values_whose_squares_overflow_count_as_missing(kind):
    """A fuzz of the stream job met this: a first batch at 1e300 made the variance inf x 0 = NaN and the
    subspace model's eigendecomposition failed, a crash the job would meet again after every restart. Beyond
    ±MAX_ABS_INPUT a value counts as missing (imputed and counted), whatever the batch it comes in."""
    rng = np.random.default_rng(4)
    det = DeviceDetector.create(["a", "b", "c"], load_config(env={}), kind=kind)
    batches = [np.full((16, 3), 1e300), np.where(rng.random((16, 3)) < 0.3, -1e200, rng.normal(size=(16, 3)))]
    batches += [rng.normal(size=(16, 3)) for _ in range(30)]
    batches[20][5, 1] = 1e155
    results = [feed(det, X, start=16 * j)[0] for j, X in enumerate(batches)]
    assert all(np.isfinite(r.scores).all() for r in results)
    beyond = sum(int((np.abs(X) > MAX_ABS_INPUT).sum()) for X in batches)
    assert sum(r.n_imputed for r in results) == beyond > 16 * 3
    reject = DeviceDetector.create(["a", "b", "c"], load_config(env={}), nan_policy="reject")
    with pytest.raises(NonFiniteMetricError, match="beyond"):
        feed(reject, np.full((16, 3), 1e300))


@settings(max_examples=40, deadline=None)
@given(st.lists(arrays(np.float64, (16, 3), elements=st.floats(allow_nan=True, allow_infinity=True)),
                min_size=1, max_size=6))
def test_any_float_values_give_finite_scores_and_no_error(batches):
    """Whatever the floats (NaN, ±inf, subnormal, near the float limit), scoring and learning neither raise nor
    return a non-finite score (hostile input reaches the detector as valid telemetry)."""
    det = DeviceDetector.create(["a", "b", "c"], load_config(env={}))
    for j, X in enumerate(batches):
        assert np.isfinite(feed(det, X, start=16 * j)[0].scores).all()


# -- the time of day as an input (model.features.time_of_day) ---------------------------------------------------


def daily_cycle(days, seed=0):
    """Readings every 5 minutes whose metrics follow the clock (a busy afternoon, a quiet night), and their times."""
    rng = np.random.default_rng(seed)
    ts = np.arange(days * 288, dtype=np.int64) * FIVE_MINUTES_MS
    load = 0.5 + 0.3 * np.sin(2 * np.pi * ts / 86_400_000)
    X = np.stack([load, 0.8 * load + 0.1, 1.0 - load, 0.5 + 0.02 * rng.normal(size=len(ts))], axis=1)
    return X + rng.normal(0, 0.01, size=X.shape), ts


def stream(det, X, ts, batch=16):
    return [det.process_many(X[i:i + batch], ts=ts[i:i + batch]) for i in range(0, len(X), batch)]


def test_the_time_of_day_adds_two_inputs_that_need_the_readings_times_and_are_never_blamed():
    det = make(kind="subspace", time_of_day=True)
    assert det.input_names == METRICS + ["time_of_day:sin", "time_of_day:cos"]
    assert det.architecture.startswith(f"subspace/{6 * det.settings.subspace_window}/")
    X, ts = daily_cycle(3)
    with pytest.raises(ValueError, match="model.features.time_of_day needs every reading's event time"):
        det.process_many(X[:16])
    with pytest.raises(ValueError, match="got 15 for 16 readings"):
        det.process_many(X[:16], ts=ts[:15])
    results = stream(det, X, ts)
    named = {metric for r in results for top in r.top_metrics for metric, _ in top}
    assert named and named <= set(METRICS)
    assert all(r.metric_shares.shape[1] == len(METRICS) for r in results)
    np.testing.assert_allclose(results[-1].metric_shares.sum(axis=1), 1.0)
    assert det.score_many(X[:8], ts=ts[:8]).shape == (8,)
    assert make(kind="subspace").input_names == METRICS  # off: the metrics alone, as before


def test_a_daily_cycle_that_stops_is_seen_only_with_the_time_of_day():
    """The metrics freeze at their daily mean for half a day, in their usual relations to one another: without
    the time every reading is ordinary; with it, the cycle that should have gone on is missing."""
    X, ts = daily_cycle(12)
    stopped = slice(len(X) - 144, len(X))
    X[stopped, :3] = X[stopped, :3].mean(axis=0) + np.random.default_rng(1).normal(0, 0.01, size=(144, 3))
    rates = {}
    for on in (False, True):
        det = make(kind="subspace", time_of_day=on)
        flags = np.concatenate([r.is_anomaly for r in stream(det, X, ts)])
        rates[on] = float(flags[stopped].mean())
    assert rates[True] > 0.5 > 0.1 > rates[False]


def test_a_detector_with_the_time_of_day_restores_and_goes_on_identically():
    X, ts = daily_cycle(3)
    det = make(kind="subspace", time_of_day=True, adoption_policy="validated")
    stream(det, X[:600], ts[:600])
    copy = DeviceDetector.from_bytes(det.to_bytes())
    assert copy.input_names == det.input_names and copy.held_readings.shape[1] == 6
    assert copy.adopt_global(copy.get_weights(), 1) == 0.0  # validated on its held readings, times included
    det.adopt_global(det.get_weights(), 1)
    a, b = stream(det, X[600:], ts[600:]), stream(copy, X[600:], ts[600:])
    np.testing.assert_array_equal(np.concatenate([r.scores for r in a]), np.concatenate([r.scores for r in b]))


def test_harmonics_of_the_day_are_more_inputs_with_the_same_known_moments():
    det = make(kind="subspace", time_of_day=True, time_of_day_harmonics=3)
    assert det.input_names[len(METRICS):] == ["time_of_day:sin", "time_of_day:cos", "time_of_day:sin2",
                                              "time_of_day:cos2", "time_of_day:sin3", "time_of_day:cos3"]
    X, ts = daily_cycle(2)
    results = stream(det, X, ts)
    assert all(r.metric_shares.shape[1] == len(METRICS) for r in results)
    time_columns = det.features.value_columns(range(len(METRICS), len(det.input_names)))
    np.testing.assert_allclose(det.scaler.mean[time_columns], 0.0)
    np.testing.assert_allclose(det.scaler.var[time_columns], 0.5)
    from models.features import time_of_day
    day = time_of_day(np.arange(288) * FIVE_MINUTES_MS, harmonics=3)   # over a whole day, exactly those moments
    np.testing.assert_allclose(day.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(day.var(axis=0), 0.5)
    for wrong in (lambda: time_of_day([0], harmonics=0), lambda: make(time_of_day=True, time_of_day_harmonics=0)):
        with pytest.raises(ValueError, match="time_of_day_harmonics must be >= 1"):
            wrong()
