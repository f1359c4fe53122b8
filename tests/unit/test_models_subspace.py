"""SubspaceModel: the online covariance against NumPy's, forgetting, scoring, weights and state."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.subspace import LEARN_CHUNK, SubspaceModel, _eigh, forgetting_factor, orthonormal_columns


def correlated(n, d=6, latent=2, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, latent)) @ rng.normal(size=(latent, d)) + noise * rng.normal(size=(n, d)) + 3.0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3 * LEARN_CHUNK), st.sampled_from([0, 50, 400]), st.integers(1, 40), st.integers(0, 99))
def test_full_rank_covariance_matches_numpy_weighted_covariance(n, half_life, batch, seed):
    """With rank >= inputs the update is exact: mean and covariance equal NumPy's, with each reading weighted by
    the forgetting factor to the power of its age."""
    X = correlated(n, seed=seed)
    model = SubspaceModel(rank=6, half_life=half_life)
    for i in range(0, n, batch):
        model.learn_many(X[i:i + batch])
    ages = np.arange(n - 1, -1, -1)
    weights = forgetting_factor(half_life) ** ages
    assert model.weight == pytest.approx(weights.sum())
    np.testing.assert_allclose(model.mean, weights @ X / weights.sum(), atol=1e-9)
    expected = np.cov(X.T, aweights=weights, bias=True) if n > 1 else np.zeros((6, 6))
    np.testing.assert_allclose(model.covariance, expected, rtol=1e-5, atol=1e-5)  # the basis is float32: entries
    # of ~5 came out 1.3e-5 (2.6e-6 relative) from NumPy's on one example hypothesis found (5 December)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 2 * LEARN_CHUNK), st.integers(0, 2 * LEARN_CHUNK), st.sampled_from([0, 50]),
       st.integers(1, 40), st.integers(0, 99), st.booleans())
def test_rescaling_what_was_learned_equals_learning_it_in_the_new_units(n, more, half_life, batch, seed, read_first):
    """A detector's scaler moves as it learns: x → a·x + c per input (a = 0 included: an input whose old values
    no longer vary). Learning rows, rescaling (then more rows, in the new units) gives the model that learned every
    row in the new units; whether a reader settles the rescale first or the next learning step takes it."""
    rng = np.random.default_rng(seed)
    X = correlated(n + more, seed=seed)
    a = rng.uniform(0.2, 3.0, size=6) * (rng.random(6) > 0.15)
    c = rng.normal(size=6)
    model, direct = SubspaceModel(rank=6, half_life=half_life), SubspaceModel(rank=6, half_life=half_life)
    for i in range(0, n, batch):
        model.learn_many(X[i:min(i + batch, n)])
    model.rescale(a, c)
    if read_first:
        model.residuals(X[:1])
    if more:
        model.learn_many(X[n:] * a + c)
    direct.learn_many(X * a + c)
    np.testing.assert_allclose(model.mean, direct.mean, atol=1e-9)
    np.testing.assert_allclose(model.covariance, direct.covariance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.basis.T @ model.basis, np.eye(6), atol=1e-6)  # still orthonormal
    assert model.k == direct.k or abs(model.explained_ratio - direct.explained_ratio) < 1e-6


def test_low_rank_tracks_the_top_eigenpairs_and_the_exact_trace():
    X = correlated(3000, d=30, latent=4, seed=1)
    model = SubspaceModel(explained_variance=0.9, rank=8, half_life=0)
    for i in range(0, 3000, 16):
        model.learn_many(X[i:i + 16])
    C = np.cov(X.T, bias=True)
    values, vectors = np.linalg.eigh(C)
    values, vectors = values[::-1], vectors[:, ::-1]
    np.testing.assert_allclose(model.eigenvalues[:4] / model.weight, values[:4], rtol=0.01)
    np.testing.assert_allclose(model.variances, np.diag(C), rtol=1e-9)        # the trace is exact
    assert model.k == int(np.searchsorted(np.cumsum(values) / values.sum(), 0.9) + 1)
    U = model.basis[:, :model.k].astype(float)   # the tracked subspace is the top one
    captured = np.trace(U.T @ C @ U) / values[:model.k].sum()
    assert captured > 0.999


def test_a_rank_too_small_for_the_explained_variance_rule_is_reported():
    X = correlated(3000, d=30, latent=4, seed=1)
    wide, narrow = SubspaceModel(rank=8, half_life=0), SubspaceModel(rank=2, half_life=0)
    assert not narrow.rank_bound                      # nothing learned yet
    wide.learn_many(X)
    narrow.learn_many(X)
    assert wide.k == 4 and wide.explained_ratio >= 0.9 and not wide.rank_bound
    assert narrow.k == 2 and narrow.explained_ratio < 0.9 and narrow.rank_bound
    complete = SubspaceModel(rank=30, explained_variance=1.0, half_life=0)  # every input tracked: never bound
    complete.learn_many(X)
    assert complete.k == 30 and not complete.rank_bound


def test_forgetting_tracks_a_level_shift():
    X = correlated(4200, seed=2)
    X[2000:] += 5.0
    forgetful, stubborn = SubspaceModel(rank=3, half_life=200), SubspaceModel(rank=3, half_life=0)
    for i in range(0, 4000, 16):
        forgetful.learn_many(X[i:i + 16])
        stubborn.learn_many(X[i:i + 16])
    level = X[3000:].mean(axis=0)
    assert np.abs(forgetful.mean - level).max() < 0.3           # 2000 readings = 10 half-lives after the shift
    assert np.abs(stubborn.mean - level).max() > 2.0            # no forgetting: halfway between the levels
    after = X[4000:]
    assert forgetful.score_many(after).mean() < stubborn.score_many(after).mean() / 5


def test_residual_is_what_k_components_cannot_reconstruct():
    X = correlated(2000, d=5, latent=1, seed=4, noise=0.01)
    model = SubspaceModel(explained_variance=0.9, rank=4, half_life=0)
    model.learn_many(X)
    assert model.k == 1
    direction = model.basis[:, 0].astype(float)
    inside = model.mean + 3.0 * direction * np.sqrt(model.eigenvalues[0] / model.weight)
    outside = model.mean + np.linalg.qr(np.c_[direction, np.eye(5)])[0][:, 1]
    assert model.score_one(inside) < 1e-6 < 0.1 < model.score_one(outside)


def test_weights_are_a_small_float32_factor_and_set_weights_round_trips():
    model = SubspaceModel(rank=3, half_life=0)
    X = correlated(500, seed=5)
    model.learn_many(X)
    factor, mean, var = model.get_weights()
    assert factor.dtype == mean.dtype == var.dtype == np.float32 and factor.shape == (6, 3)
    np.testing.assert_allclose(factor @ factor.T, model.covariance - np.diag(np.diag(model.covariance))
                               + np.diag(np.einsum("ij,ij->i", factor, factor)), atol=1e-4)
    other = SubspaceModel(rank=3, half_life=0)
    other.set_weights(model.get_weights())
    assert other.weight == 6 and other.k == model.k    # a fresh model takes them as worth d readings
    np.testing.assert_allclose(other.score_many(X[:50]), model.score_many(X[:50]), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="weight array"):
        other.set_weights([factor[:, :2], mean, var])


def test_state_round_trip_and_rebaseline():
    model = SubspaceModel(rank=3, half_life=100)
    model.learn_many(correlated(300, seed=6))
    clone = SubspaceModel(rank=3, half_life=100)
    clone.set_state(model.get_state())
    X = correlated(64, seed=7)
    np.testing.assert_array_equal(clone.score_many(X), model.score_many(X))
    model.learn_many(X)
    clone.learn_many(X)
    np.testing.assert_array_equal(clone.score_many(X), model.score_many(X))
    model.rebaseline(10.0)
    assert model.weight == 10.0 and model.variances == pytest.approx(clone.variances)


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="explained_variance"):
        SubspaceModel(explained_variance=1.5)
    with pytest.raises(ValueError, match="half_life"):
        SubspaceModel(half_life=-1)
    with pytest.raises(ValueError, match="expected 6 features"):
        model = SubspaceModel()
        model.learn_many(np.zeros((2, 6)))
        model.score_many(np.zeros((2, 5)))


def test_eigh_and_cholesky_qr_are_numpys_without_the_wrappers():
    """`_eigh` gives np.linalg.eigh's results bit for bit and its error on failure; `orthonormal_columns` falls back
    to Householder QR for dependent columns (where Cholesky fails) and agrees with it in span otherwise."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(20, 20))
    gram = A @ A.T
    values, vectors = _eigh(gram)
    expected_values, expected_vectors = np.linalg.eigh(gram)
    assert np.array_equal(values, expected_values) and np.array_equal(vectors, expected_vectors)
    with pytest.raises(np.linalg.LinAlgError):
        _eigh(np.full((4, 4), np.nan))
    E = rng.normal(size=(30, 4))
    Q = orthonormal_columns(E)
    assert np.allclose(Q.T @ Q, np.eye(4), atol=1e-12) and np.allclose(Q @ (Q.T @ E), E)
    dependent = np.hstack([E[:, :2], E[:, :2]])
    Q = orthonormal_columns(dependent)
    assert np.all(np.isfinite(Q)) and np.allclose(Q @ (Q.T @ dependent), dependent)


def test_row_weights_of_one_change_nothing_and_a_light_row_moves_the_model_little():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 6))
    plain, weighted = (SubspaceModel(rank=4, half_life=100) for _ in range(2))
    plain.learn_many(X)
    weighted.learn_many(X, weights=np.ones(200))
    np.testing.assert_allclose(weighted.mean, plain.mean)
    np.testing.assert_allclose(weighted.eigenvalues, plain.eigenvalues)
    base = plain.mean.copy()
    outlier = np.full((1, 6), 50.0)
    weighted.learn_many(outlier, weights=np.array([0.01]))
    plain.learn_many(outlier)
    light, full = np.abs(weighted.mean - base).max(), np.abs(plain.mean - base).max()
    assert 0 < light < full / 50   # weight 0.01 against 1
