"""Aggregation rules, validation and strategies."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from config import load_config
from models.aggregation import (AggregationError, ClusteredFedAvg, FedAvg, FedMedian, FedTrimmedAvg, SnapshotLimits,
                                ValidationPolicy, bounded_weights, coordinate_median, cosine_similarity, fedavg,
                                make_strategy, newest_plausible, snapshot_problem, trimmed_mean, validate_updates)
from models.updates import Update, flatten

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


def test_make_strategy_with_privacy_wraps_fedavg_and_reports_epsilon():
    cfg = load_config(env={"FLEAD_PRIVACY_ENABLED": "true"})
    strategy = make_strategy(cfg, dp_history={"accountant": None})
    result = strategy.aggregate(honest_updates(5), current=[np.ones(s) for s in SHAPES])
    assert result.strategy == "dp-fedavg" and result.extra["dp"]["epsilon"] > 0 and result.private
    resumed = make_strategy(cfg, dp_history=result.extra["dp"]).aggregate(honest_updates(5),
                                                                          current=[np.ones(s) for s in SHAPES])
    assert resumed.extra["dp"]["rounds"] == 2 and resumed.extra["dp"]["epsilon"] > result.extra["dp"]["epsilon"]
    with pytest.raises(AggregationError, match="fedavg"):
        make_strategy(load_config(env={"FLEAD_PRIVACY_ENABLED": "true", "FLEAD_AGGREGATION_STRATEGY": "median"}))
    with pytest.raises(AggregationError, match="distributed DP"):
        make_strategy(load_config(env={"FLEAD_PRIVACY_ENABLED": "true", "FLEAD_PRIVACY_SECURE_AGGREGATION": "true"}))
    with pytest.raises(AggregationError, match="cohort"):
        make_strategy(load_config(env={"FLEAD_PRIVACY_SECURE_AGGREGATION": "true"}))


def test_every_strategy_has_one_interface():
    current = [np.ones(s) for s in SHAPES]
    for name in ("fedavg", "median", "trimmed_mean", "clustered"):
        strategy = make_strategy(load_config(env={"FLEAD_AGGREGATION_STRATEGY": name}))
        assert strategy.aggregate(honest_updates(10), current).strategy == strategy.name == name
        assert strategy.aggregate(honest_updates(10)).participants


# ---------------------------------------------------------------- bounded influence (issue 14.2)

def test_bounded_weights_cap_at_the_median_times_the_factor():
    assert bounded_weights([10, 20, 30], None).tolist() == [10, 20, 30]
    assert bounded_weights([10, 20, 2 ** 53], 2.0).tolist() == [10, 20, 40]
    with pytest.raises(AggregationError, match="≥ 1"):
        bounded_weights([1, 2], 0.5)


def crafted_attack(honest, rng):
    """The probe of issue 14.1: an update 6x the median norm at cosine 0.05 to the honest direction, claiming
    n_samples = 2^53 (inside the norm and cosine limits)."""
    mean = flatten(fedavg([(u.weights, u.n_samples) for u in honest]))
    direction = mean / np.linalg.norm(mean)
    orthogonal = rng.normal(size=mean.shape)
    orthogonal -= (orthogonal @ direction) * direction
    orthogonal /= np.linalg.norm(orthogonal)
    median_norm = np.median([np.linalg.norm(flatten(u.weights)) for u in honest])
    vector = 6 * median_norm * (0.05 * direction + np.sqrt(1 - 0.05 ** 2) * orthogonal)
    like = honest[0].weights
    from models.updates import unflatten
    return Update("attacker", unflatten(vector, like), 2 ** 53), vector, mean


def test_crafted_n_samples_update_does_not_take_over_fedavg():
    """Issue 14.1: before, the global model was the attacker's (cosine 1.000); now its weight is capped."""
    rng = np.random.default_rng(11)
    shapes = [(19, 16), (16,), (16, 4), (4,), (4, 16), (16,), (16, 19), (19,)]   # the default detector, 28 devices
    centre = [rng.normal(size=s) for s in shapes]
    honest = [Update(f"d{i}", [c + 0.1 * rng.normal(size=c.shape) for c in centre], int(rng.integers(400, 600)))
              for i in range(28)]
    attack, attack_vector, honest_mean = crafted_attack(honest, rng)
    assert [d for d, _ in validate_updates(honest + [attack], shapes, 10.0, 0.0)[1]] == []   # passes both checks
    result = FedAvg(policy=ValidationPolicy(max_norm_ratio=10.0, min_cosine=0.0)).aggregate(honest + [attack])
    model = flatten(result.weights)
    assert "attacker" in result.participants
    assert cosine_similarity(model, attack_vector) < 0.5
    assert cosine_similarity(model, honest_mean) > 0.9
    uncapped = FedAvg(policy=ValidationPolicy(sample_cap_factor=None)).aggregate(honest + [attack])
    assert cosine_similarity(flatten(uncapped.weights), attack_vector) > 0.999   # what the probe saw before


def snap(version, n_seen, n_samples=10, created_at=None, device="dev"):
    return Update(device, [np.ones(2)], n_samples, version, n_seen, created_at)


def test_snapshot_counters_must_follow_the_previous_snapshot():
    limits = SnapshotLimits(max_readings_per_s=100.0)
    previous = snap(4, 2000, created_at=0)
    assert snapshot_problem(snap(5, 2500, 500, created_at=60_000), previous, limits) is None
    assert "does not follow" in snapshot_problem(snap(4, 2600, created_at=60_000), previous, limits)
    assert "exceeds the 500 readings seen" in snapshot_problem(snap(5, 2500, 501, created_at=60_000), previous, limits)
    assert "new reading" in snapshot_problem(snap(10 ** 6, 2500, created_at=60_000), previous, limits)
    assert "readings/s" in snapshot_problem(snap(5, 2000 + 2 ** 40, 2 ** 40, created_at=60_000), previous, limits)
    assert "new reading" in snapshot_problem(snap(10 ** 6, 50), None, limits)


def test_version_one_million_does_not_displace_the_honest_snapshot():
    """Issue 14.1: a snapshot with version 10^6 for a real device must not replace its honest update."""
    limits = SnapshotLimits(max_readings_per_s=10_000.0)
    honest = [snap(3, 1500, 500, created_at=0), snap(4, 2000, 500, created_at=60_000)]
    forged = snap(10 ** 6, 10 ** 6 + 10, 2 ** 53, created_at=61_000)
    chosen, skipped = newest_plausible(honest + [forged], limits)
    assert chosen is honest[1]
    assert skipped and skipped[0][1].startswith("v1000000")


@pytest.mark.parametrize("name", ["updates", "aggregation", "privacy", "secure_aggregation", "integrity"])
def test_docstring_examples_of_the_federated_core(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"models.{name}"))
    assert result.failed == 0 and result.attempted > 0
