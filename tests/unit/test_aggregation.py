"""Aggregation rules, validation and strategies."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from config import load_config
from models.aggregation import (AggregationError, ClusteredFedAvg, FedAvg, FedMedian, FedTrimmedAvg, Update,
                                ValidationPolicy, coordinate_median, fedavg, flatten, make_strategy, trimmed_mean,
                                validate_updates)

SHAPES = [(3, 2), (2,)]


def model(rng, scale=1.0, centre=1.0):
    return [centre + scale * rng.normal(size=s) for s in SHAPES]


def honest_updates(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Update(f"d{i}", model(rng, scale=0.1), n_samples=int(rng.integers(10, 100))) for i in range(n)]


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (4, 3), elements=finite), st.integers(1, 6))
def test_fedavg_of_identical_models_is_that_model(layer, copies):
    weights = [layer, layer[0]]
    out = fedavg([(weights, n) for n in range(1, copies + 1)])
    for got, expected in zip(out, weights):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(arrays(np.float64, (5,), elements=finite), st.integers(1, 1000)), min_size=1, max_size=8))
def test_fedavg_equals_weighted_mean(pairs):
    out = fedavg([([w], n) for w, n in pairs])[0]
    expected = np.average(np.stack([w for w, _ in pairs]), axis=0, weights=[n for _, n in pairs])
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)


def test_median_and_trimmed_mean_resist_30_percent_poison():
    honest = honest_updates(7)
    target = fedavg([(u.weights, u.n_samples) for u in honest])
    rng = np.random.default_rng(1)
    poisoned = [[100 * w for w in model(rng)], [-w for w in honest[0].weights], model(rng, scale=50.0, centre=-40)]
    pairs = [(u.weights, u.n_samples) for u in honest] + [(p, 1000) for p in poisoned]   # 3 of 10 = 30 %
    for rule in (coordinate_median, lambda r: trimmed_mean(r, 0.3)):
        error = np.linalg.norm(flatten(rule(pairs)) - flatten(target))
        assert error < 0.2, error
    assert np.linalg.norm(flatten(fedavg(pairs)) - flatten(target)) > 10   # plain FedAvg does not


def test_validation_rejects_each_kind_with_its_reason():
    good = honest_updates(6)
    rng = np.random.default_rng(2)
    bad = [
        Update("layers", good[0].weights[:1], 10),
        Update("shape", [np.zeros((2, 3)), np.zeros(2)], 10),
        Update("dtype", [w.astype(np.int64) for w in good[0].weights], 10),
        Update("nan", [good[0].weights[0], np.array([np.nan, 1.0])], 10),
        Update("norm", [100 * w for w in model(rng)], 10),
        Update("flip", [-w for w in good[1].weights], 10),
        Update("zero-samples", good[2].weights, 0),
    ]
    accepted, rejected, norms = validate_updates(good + bad, SHAPES, max_norm_ratio=10.0, min_cosine=0.0)
    reasons = dict(rejected)
    assert [u.device_id for u in accepted] == [u.device_id for u in good]
    assert "number of layers" in reasons["layers"]
    assert "wrong shape" in reasons["shape"]
    assert "dtype" in reasons["dtype"]
    assert "non-finite" in reasons["nan"]
    assert "median norm" in reasons["norm"]
    assert "cosine" in reasons["flip"]
    assert "n_samples" in reasons["zero-samples"]
    assert norms["flip"] == pytest.approx(norms["d1"])   # a sign flip keeps the norm: only the cosine sees it


def test_min_cosine_none_switches_the_direction_check_off():
    updates = honest_updates(4) + [Update("flip", [-w for w in honest_updates(1)[0].weights], 10)]
    accepted, rejected, _ = validate_updates(updates, SHAPES, 10.0, min_cosine=None)
    assert len(accepted) == 5 and not rejected


def test_strategies_validate_first_and_report():
    updates = honest_updates(6) + [Update("nan", [np.full((3, 2), np.nan), np.zeros(2)], 5)]
    for strategy in (FedAvg(), FedMedian(), FedTrimmedAvg(0.2), ClusteredFedAvg(clusters=2)):
        result = strategy.aggregate(updates)
        assert result.participants == [f"d{i}" for i in range(6)]
        assert result.rejected[0][0] == "nan"
        assert [w.shape for w in result.weights] == SHAPES
        assert set(result.norms) == set(result.participants)


def test_preconditions_explain_the_theory():
    with pytest.raises(AggregationError, match=r"no robustness"):
        trimmed_mean([([np.zeros(2)], 1)] * 4, 0.2)   # ⌊0.2·4⌋ = 0: nothing trimmed
    with pytest.raises(AggregationError, match=r"needs at least 5"):
        FedTrimmedAvg(0.2).aggregate(honest_updates(4))
    with pytest.raises(AggregationError, match="cannot out-vote"):
        FedMedian().aggregate(honest_updates(2))
    with pytest.raises(AggregationError, match="needs at least 2"):
        FedAvg().aggregate(honest_updates(1))
    with pytest.raises(AggregationError, match="0.5"):
        trimmed_mean([([np.zeros(2)], 1)] * 5, 0.5)


def test_clustered_fedavg_finds_the_groups():
    rng = np.random.default_rng(3)
    updates = [Update(f"a{i}", model(rng, 0.05, centre=1.0), 10) for i in range(4)]
    updates += [Update(f"b{i}", model(rng, 0.05, centre=3.0), 10) for i in range(4)]
    result = ClusteredFedAvg(clusters=2, seed=0, policy=ValidationPolicy(min_cosine=None)).aggregate(updates)
    clusters = result.extra["clusters"]
    assert len({clusters[f"a{i}"] for i in range(4)}) == 1 and len({clusters[f"b{i}"] for i in range(4)}) == 1
    assert clusters["a0"] != clusters["b0"]
    means = sorted(float(flatten(w).mean()) for w in result.extra["cluster_weights"])
    assert means[0] == pytest.approx(1.0, abs=0.1) and means[1] == pytest.approx(3.0, abs=0.1)
    again = ClusteredFedAvg(clusters=2, seed=0, policy=ValidationPolicy(min_cosine=None)).aggregate(updates)
    assert again.extra["clusters"] == clusters   # seeded


@pytest.mark.parametrize("name,cls", [("fedavg", FedAvg), ("median", FedMedian), ("trimmed_mean", FedTrimmedAvg),
                                      ("clustered", ClusteredFedAvg)])
def test_make_strategy_reads_the_config(name, cls):
    cfg = load_config(env={"FLEAD_AGGREGATION_STRATEGY": name})
    strategy = make_strategy(cfg)
    assert isinstance(strategy, cls)
    assert strategy.policy.min_cosine == cfg.aggregation.min_cosine


def test_make_strategy_with_privacy_reports_epsilon():
    cfg = load_config(env={"FLEAD_PRIVACY_ENABLED": "true"})
    strategy = make_strategy(cfg)
    updates = honest_updates(5)
    result = strategy.aggregate(updates, current=[np.ones(s) for s in SHAPES])
    assert result.strategy == "dp-fedavg" and result.extra["dp_epsilon"] > 0
    with pytest.raises(AggregationError, match="fedavg"):
        make_strategy(load_config(env={"FLEAD_PRIVACY_ENABLED": "true", "FLEAD_AGGREGATION_STRATEGY": "median"}))


def test_secure_fedavg_strategy_matches_plain_fedavg():
    cfg = load_config(env={"FLEAD_PRIVACY_SECURE_AGGREGATION": "true"})
    updates = honest_updates(5)
    secure = make_strategy(cfg).aggregate(updates)
    plain = FedAvg().aggregate(updates)
    assert secure.strategy == "secure-fedavg"
    np.testing.assert_allclose(flatten(secure.weights), flatten(plain.weights), atol=1e-6)
