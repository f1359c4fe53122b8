"""DeviceDetector: the contract of docs/contracts.md."""
import numpy as np
import pytest

from config import load_config
from models.detector import DeviceDetector
from models.features import NonFiniteMetricError
from models.serialization import SerializationError, loads

METRICS = ["cpu", "mem", "disk", "net"]
WARMUP = 100


def normal_readings(n, seed=0):
    """Correlated metrics in [0, 1] with a daily-like cycle: what an autoencoder can learn."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 0.5 + 0.2 * np.sin(t / 10.0)
    X = np.stack([base, 0.8 * base + 0.1, 1.0 - base, 0.3 + 0.1 * np.cos(t / 7.0)], axis=1)
    return X + rng.normal(0, 0.01, size=X.shape)


def make(**overrides):
    settings = dict(hidden=[8, 3, 8], warmup=WARMUP, learning_rate=0.01, seed=1)
    settings.update(overrides)
    return DeviceDetector.create(METRICS, load_config(env={}), **settings)


def feed(det, X, batch=16):
    return [det.process_many(X[i:i + batch]) for i in range(0, X.shape[0], batch)]


def test_create_reads_config_and_overrides():
    det = make()
    assert det.settings.hidden == (8, 3, 8) and det.settings.kind == "ae"
    assert det.settings.threshold_kind == "pot" and det.settings.top_k_metrics == 3
    assert det.n_seen == 0 and det.model_version == 0 and det.global_version == 0
    assert DeviceDetector.create(METRICS, hidden=[2]).settings.hidden == (2,)  # cfg defaults to load_config()
    with pytest.raises(ValueError, match="unknown detector setting"):
        make(hiden=[3])


def test_no_alerts_during_warmup_and_shapes():
    det = make()
    results = feed(det, normal_readings(WARMUP))
    assert not any(r.is_anomaly.any() for r in results)
    r = results[0]
    assert r.scores.shape == r.thresholds.shape == r.is_anomaly.shape == (16,)
    assert len(r.top_metrics) == 16 and len(r.top_metrics[0]) == 3
    assert det.n_seen == WARMUP


def test_scores_fall_as_it_learns():
    det = make()
    results = feed(det, normal_readings(1600))
    early = np.mean([r.scores.mean() for r in results[:5]])
    late = np.mean([r.scores.mean() for r in results[-5:]])
    assert late < early / 5
    alarm_rate = np.mean(np.concatenate([r.is_anomaly for r in results[20:]]))
    assert alarm_rate < 0.05


@pytest.mark.parametrize("kind", ["ae", "lstm_ae"])
def test_spike_is_flagged_with_the_right_top_metric(kind):
    det = make(kind=kind, window=8, lstm_hidden=8)
    X = normal_readings(1200)
    feed(det, X)
    spike = normal_readings(1201)[-1:].copy()
    spike[0, 2] += 0.6  # disk jumps while its peers stay put
    res = det.process_many(spike)
    assert res.is_anomaly[0], (res.scores, res.thresholds)
    metric, share = res.top_metrics[0][0]
    assert metric == "disk" and share > 1.2 / len(METRICS)  # above an even split
    assert sum(s for _, s in res.top_metrics[0]) <= 1.0 + 1e-12


@pytest.mark.parametrize("overrides", [{}, {"kind": "lstm_ae", "window": 6, "lstm_hidden": 4},
                                       {"threshold_kind": "quantile", "rolling_windows": [4], "lags": [1],
                                        "rate_of_change": True, "optimizer": "sgd"}])
def test_to_bytes_round_trip_gives_identical_scores(overrides):
    det = make(**overrides)
    X = normal_readings(400)
    feed(det, X[:300])
    det.snapshot()
    clone = DeviceDetector.from_bytes(det.to_bytes())
    assert (clone.n_seen, clone.model_version, clone.loss) == (det.n_seen, det.model_version, det.loss)
    for a, b in zip(feed(det, X[300:]), feed(clone, X[300:])):
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.thresholds, b.thresholds)
        assert a.top_metrics == b.top_metrics


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


def test_adopt_global_replace_and_blend():
    det = make()
    feed(det, normal_readings(32))
    local = det.get_weights()
    global_weights = [np.ones_like(w) for w in local]
    blended = make()
    blended.set_weights(local)
    blended.adopt_global(global_weights, version=3, policy="blend", blend_weight=0.25)
    for b, w in zip(blended.get_weights(), local):
        np.testing.assert_allclose(b, 0.75 * w + 0.25)
    det.adopt_global(global_weights, version=4, policy="replace")
    assert det.global_version == 4
    for w in det.get_weights():
        np.testing.assert_array_equal(w, 1.0)
    with pytest.raises(ValueError, match="weight array"):
        det.adopt_global(global_weights[:-1] + [np.ones(7)], version=5)
    with pytest.raises(ValueError, match="global_policy"):
        det.adopt_global(global_weights, version=5, policy="average")


def test_nan_impute_is_counted_and_reject_raises():
    X = normal_readings(32)
    X[3, 1] = np.nan
    X[9, 0] = np.inf
    det = make()
    results = feed(det, X)
    assert results[0].n_imputed == 2 and det.features.n_imputed == 2
    assert np.isfinite(results[0].scores).all()
    strict = make(nan_policy="reject")
    with pytest.raises(NonFiniteMetricError, match="'mem'"):
        strict.process_many(X[:16])
    assert strict.n_seen == 0


def test_score_many_changes_no_state():
    det = make()
    X = normal_readings(64)
    feed(det, X[:48])
    before = det.to_bytes()
    det.score_many(X[48:])
    assert det.to_bytes() == before


def test_wrong_number_of_metrics_is_an_error():
    with pytest.raises(ValueError, match="expected 4 metrics"):
        make().process_many(np.zeros((2, 3)))


@pytest.mark.parametrize("overrides", [{}, {"rolling_windows": [4], "lags": [1], "rate_of_change": True}])
def test_process_many_is_score_many_then_learn_many(overrides):
    X = normal_readings(96)
    X[5, 1] = np.nan
    fused, split = make(**overrides), make(**overrides)
    for i in range(0, 96, 16):
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
    assert det.top_metrics(np.zeros((1, 3 * len(METRICS)))) == [[("cpu", 0.0), ("mem", 0.0), ("disk", 0.0)]]


def test_an_empty_batch_is_a_clear_error():
    import numpy as np
    import pytest

    from models.detector import DeviceDetector

    detector = DeviceDetector.create(["a", "b"], hidden=[4, 2, 4])
    with pytest.raises(ValueError, match="empty batch"):
        detector.process_many(np.zeros((0, 2)))
