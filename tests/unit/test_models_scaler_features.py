"""RunningScaler (Welford / Chan) and FeatureBuilder (rolling features, NaN policy)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from models.features import FeatureBuilder, NonFiniteMetricError
from models.scaler import RunningScaler

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(1, 4)), elements=finite),
       st.integers(1, 7))
def test_welford_and_chan_equal_numpy(X, batch):
    one, many = RunningScaler(), RunningScaler()
    for x in X:
        one.learn_one(x)
    for start in range(0, X.shape[0], batch):
        many.learn_many(X[start:start + batch])
    tol = 1e-9 * (1 + np.abs(X).max() ** 2)
    for s in (one, many):
        assert s.n == X.shape[0]
        np.testing.assert_allclose(s.mean, X.mean(axis=0), rtol=1e-9, atol=1e-9 * (1 + np.abs(X).max()))
        np.testing.assert_allclose(s.var, X.var(axis=0), rtol=1e-7, atol=tol)


def test_scaler_transform_and_state_round_trip():
    X = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 3))
    X[:, 2] = 7.0  # constant: centred, not divided
    s = RunningScaler()
    s.learn_many(X)
    Z = s.transform_many(X)
    np.testing.assert_allclose(Z[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, :2].std(axis=0), 1)
    np.testing.assert_array_equal(Z[:, 2], 0)
    restored = RunningScaler.from_array(s.to_array())
    np.testing.assert_array_equal(restored.transform_many(X), Z)


def naive_features(X, windows, lags):
    rows = []
    for t in range(X.shape[0]):
        row = [X[t]]
        for w in windows:
            seen = X[max(0, t - w + 1):t + 1]
            row += [seen.mean(axis=0), seen.std(axis=0)]
        row += [X[t - lag] if t >= lag else X[t] for lag in lags]
        row.append(X[t] - X[max(t - 1, 0)])
        rows.append(np.concatenate(row))
    return np.array(rows)


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_features_match_naive_definition_in_any_batching(batch):
    X = np.random.default_rng(1).normal(size=(50, 3))
    fb = FeatureBuilder(["a", "b", "c"], rolling_windows=(3, 8), lags=(1, 4), rate_of_change=True)
    out = []
    for start in range(0, 50, batch):
        out.append(fb.transform_many(X[start:start + batch]))
        fb.learn_many(X[start:start + batch])
    np.testing.assert_allclose(np.vstack(out), naive_features(X, (3, 8), (1, 4)), atol=1e-9)
    assert fb.n_features == 3 * 8 and len(fb.feature_names) == 24


def test_features_state_round_trip():
    X = np.random.default_rng(2).normal(size=(20, 2))
    fb = FeatureBuilder(["a", "b"], rolling_windows=(4,), lags=(2,))
    fb.learn_many(X[:10])
    restored = FeatureBuilder.from_array(fb.to_array(), ["a", "b"])
    np.testing.assert_array_equal(restored.transform_many(X[10:]), fb.transform_many(X[10:]))


def test_impute_uses_last_finite_value_and_counts():
    fb = FeatureBuilder(["a", "b"])
    fb.learn_many(np.array([[1.0, 2.0]]))
    X = np.array([[np.nan, 5.0], [np.inf, np.nan], [4.0, -np.inf]])
    np.testing.assert_array_equal(fb.transform_many(X), [[1.0, 5.0], [1.0, 5.0], [4.0, 5.0]])
    fb.learn_many(X)
    assert fb.n_imputed == 4
    np.testing.assert_array_equal(fb.transform_many(np.array([[np.nan, np.nan]])), [[4.0, 5.0]])


def test_impute_before_any_finite_value_uses_batch_mean_then_zero():
    fb = FeatureBuilder(["a", "b"])
    X = np.array([[np.nan, np.nan], [2.0, np.nan], [4.0, np.nan]])
    np.testing.assert_array_equal(fb.transform_many(X), [[3.0, 0.0], [2.0, 0.0], [4.0, 0.0]])


def test_reject_names_the_metric():
    fb = FeatureBuilder(["cpu", "mem"], nan_policy="reject")
    with pytest.raises(NonFiniteMetricError, match="'mem'.*row 1"):
        fb.transform_many(np.array([[1.0, 1.0], [1.0, np.nan]]))


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="nan_policy"):
        FeatureBuilder(nan_policy="drop")


def test_a_pinned_feature_keeps_its_known_moments_whatever_is_learned():
    """The time of day's sine seen over part of a day is a narrow arc: it is scaled by its moments over a whole
    day (mean 0, variance 1/2), not by the arc's; the other features learn as before."""
    arc = np.sin(np.linspace(0.0, 0.3, 50))
    X = np.column_stack([np.linspace(1.0, 2.0, 50), arc])
    pinned, plain = RunningScaler(), RunningScaler()
    pinned.pin([1], 0.0, 0.5)
    for scaler in (pinned, plain):
        scaler.learn_many(X[:20])
        scaler.learn_one(X[20])
        scaler.learn_many(X[21:])
    np.testing.assert_allclose(pinned.mean, [plain.mean[0], 0.0])
    np.testing.assert_allclose(pinned.var, [plain.var[0], 0.5])
    np.testing.assert_allclose(pinned.transform_batch(X[-1:])[0, 1], arc[-1] / np.sqrt(0.5))
    assert plain.transform_batch(X[-1:])[0, 1] > 1.5      # the arc's own spread would make it a ramp
    first = RunningScaler()
    first.pin([1], 0.0, 0.5)                                # a first batch is scaled by the known moments too
    np.testing.assert_allclose(first.transform_batch(X[:5])[:, 1], arc[:5] / np.sqrt(0.5))
    pinned.rebaseline(10)
    assert pinned.var[1] == pytest.approx(0.5)


def test_value_columns_are_the_inputs_own_values_and_their_lags():
    fb = FeatureBuilder(["a", "b", "t"], rolling_windows=(3,), lags=(1, 2), rate_of_change=True)
    names = fb.feature_names
    assert [names[i] for i in fb.value_columns([2])] == ["t", "t:lag1", "t:lag2"]
    assert [names[i] for i in fb.value_columns([0, 2])] == ["a", "t", "a:lag1", "t:lag1", "a:lag2", "t:lag2"]
