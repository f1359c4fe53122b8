"""models.federation: aggregation strategies average in a space where averaging means something."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.aggregation import FedAvg, Update, coordinate_median, fedavg
from models.federation import SubspaceCodec, blend_weights, subspace_moments
from models.subspace import SubspaceModel
from models.updates import IDENTITY, codec_for

ARCH = "subspace/8/r8"


def federated_vector(weights, architecture):
    return codec_for(architecture).federated_vector(weights)


def weights_from_vector(vector, like, architecture):
    return codec_for(architecture).weights_from_vector(vector, like)


def test_the_subspace_codec_is_registered_for_its_kind():
    assert isinstance(codec_for("subspace/95/r16"), SubspaceCodec) and codec_for("dense_ae/3-2-3/tanh") is IDENTITY


def device_model(seed, shift=0.0, n=800):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 8)) + 0.2 * rng.normal(size=(n, 8)) + shift
    model = SubspaceModel(rank=8, half_life=0)   # full rank: the weights carry the exact covariance
    model.learn_many(X)
    return model, X


def test_fedavg_of_vectors_is_the_pooled_mean_and_covariance():
    """FedAvg weighted by samples of [mean, vech(second moment)] = the mean and covariance of the pooled data."""
    (a, Xa), (b, Xb) = device_model(0), device_model(1, shift=2.0, n=400)
    vectors = [federated_vector(m.get_weights(), ARCH) for m in (a, b)]
    pooled = weights_from_vector(fedavg([([vectors[0]], 800), ([vectors[1]], 400)])[0], a.get_weights(), ARCH)
    mean, C = subspace_moments(pooled)
    X = np.vstack([Xa, Xb])
    np.testing.assert_allclose(mean, X.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(C, np.cov(X.T, bias=True), atol=2e-4)


def test_many_devices_at_once_give_each_device_its_own_vector_whatever_the_chunking():
    """`federated_vectors` over more devices than one chunk: row i is [μ, vech(L Lᵀ + diag(v) + μ μᵀ)] of device i,
    the same to the bit with any chunk size."""
    rng = np.random.default_rng(3)
    d, r = 6, 2
    devices = [[rng.normal(size=(d, r)).astype(np.float32), rng.normal(size=d).astype(np.float32),
                rng.random(d).astype(np.float32)] for _ in range(2 * SubspaceCodec.chunk + 5)]
    rows = SubspaceCodec().federated_vectors(devices)
    upper = np.triu_indices(d)
    for row, (factor, mean, variances) in zip(rows, devices):
        L, mu = factor.astype(np.float64), mean.astype(np.float64)
        second = L @ L.T + np.outer(mu, mu)
        second[np.diag_indices(d)] = variances + mu * mu
        np.testing.assert_allclose(row, np.concatenate([mu, second[upper]]), rtol=1e-12, atol=1e-12)
    one_at_a_time = SubspaceCodec()
    one_at_a_time.chunk = 1
    assert np.array_equal(one_at_a_time.federated_vectors(devices), rows)


def test_round_trip_is_the_identity_on_consistent_weights_and_keeps_dtypes():
    model, _ = device_model(2)
    weights = model.get_weights()
    back = weights_from_vector(federated_vector(weights, ARCH), weights, ARCH)
    assert [w.dtype for w in back] == [w.dtype for w in weights]
    for w, v in zip(subspace_moments(weights), subspace_moments(back)):
        np.testing.assert_allclose(w, v, atol=1e-4)


def test_truncation_drops_what_a_median_or_noise_makes_negative():
    """A coordinate-wise median of second moments need not be positive semi-definite: the inverse keeps only the
    top-r non-negative eigenpairs, so any vector gives valid weights."""
    weights = device_model(3)[0].get_weights()
    noisy = federated_vector(weights, ARCH) + np.random.default_rng(0).normal(scale=5.0, size=8 + 36)
    factor, mean, var = weights_from_vector(noisy, weights, ARCH)
    assert np.isfinite(factor).all() and (var >= 0).all()
    vectors = [[federated_vector(device_model(s)[0].get_weights(), ARCH)] for s in range(3)]
    assert weights_from_vector(coordinate_median([(v, 1) for v in vectors])[0], weights, ARCH)[0].shape == (8, 8)


def test_strategies_run_unchanged_on_codec_vectors():
    updates = [Update(f"d{s}", [federated_vector(device_model(s)[0].get_weights(), ARCH)], 100) for s in range(4)]
    result = FedAvg().aggregate(updates)
    assert len(result.participants) == 4 and result.weights[0].shape == (8 + 36,)


def test_autoencoder_codec_is_the_identity_and_blend_is_linear():
    like = [np.ones((2, 3)), np.zeros(3)]
    vector = federated_vector(like, "dense_ae/2-3-2/tanh")
    assert vector.shape == (9,)
    out = weights_from_vector(np.arange(9.0), like, "dense_ae/2-3-2/tanh")
    np.testing.assert_array_equal(out[0], np.arange(6.0).reshape(2, 3))
    mixed = blend_weights(like, [np.zeros((2, 3)), np.ones(3)], 0.25, "dense_ae/2-3-2/tanh")
    np.testing.assert_allclose(mixed[0], 0.75) and np.testing.assert_allclose(mixed[1], 0.25)
    with pytest.raises(ValueError):
        weights_from_vector(np.zeros(8), like, "dense_ae/2-3-2/tanh")
    with pytest.raises(ValueError, match="blend_weight"):
        blend_weights(like, like, 1.5, "dense_ae/2-3-2/tanh")


def test_subspace_blend_is_the_mixture_of_the_two_distributions():
    (a, Xa), (b, Xb) = device_model(4), device_model(5, shift=1.0)
    mixed = blend_weights(a.get_weights(), b.get_weights(), 0.5, ARCH)
    mean, C = subspace_moments(mixed)
    X = np.vstack([Xa, Xb])   # equal sizes: the 0.5/0.5 mixture is the pooled data
    np.testing.assert_allclose(mean, X.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(C, np.cov(X.T, bias=True), atol=2e-4)
    with pytest.raises(ValueError, match="entries"):
        weights_from_vector(np.zeros(10), a.get_weights(), ARCH)


def low_rank_model(seed=6, d=12, rank=4, n=1500):
    """A model that tracks fewer components than inputs: its variances hold more than its factor."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))
    model = SubspaceModel(explained_variance=0.9, rank=rank, half_life=0)
    model.learn_many(X)
    return model, X


def test_blending_a_low_rank_model_with_itself_changes_nothing():
    """The left-out variance on the diagonal must not be folded into the components (it used to: another basis,
    larger eigenvalues, fewer components k)."""
    model, X = low_rank_model()
    weights = model.get_weights()
    arch = model.architecture
    for b in (0.0, 0.3, 1.0):
        again = SubspaceModel(explained_variance=0.9, rank=4, half_life=0)
        again.set_weights(blend_weights(weights, weights, b, arch))
        assert again.k == model.k
        np.testing.assert_allclose(again.score_many(X), model.score_many(X), rtol=1e-4, atol=1e-6)


def test_codec_round_trip_of_a_low_rank_model_keeps_its_components():
    model, X = low_rank_model(seed=7)
    weights = model.get_weights()
    codec = codec_for(model.architecture)
    back = SubspaceModel(explained_variance=0.9, rank=4, half_life=0)
    back.set_weights(codec.weights_from_vector(codec.federated_vector(weights), weights))
    assert back.k == model.k
    np.testing.assert_allclose(back.get_weights()[2], weights[2], rtol=1e-5)   # variances exact
    np.testing.assert_allclose(back.eigenvalues / back.weight, model.eigenvalues / model.weight,
                               rtol=1e-2)   # no left-out variance folded into the components
    assert np.corrcoef(back.score_many(X), model.score_many(X))[0, 1] > 0.999


def test_subspace_blend_of_low_rank_models_mixes_means_and_variances_exactly():
    (a, Xa), (b, Xb) = low_rank_model(seed=8), low_rank_model(seed=9)
    mixed = blend_weights(a.get_weights(), b.get_weights(), 0.25, a.architecture)
    delta = a.mean - b.mean
    np.testing.assert_allclose(mixed[1], 0.75 * a.mean + 0.25 * b.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[2], 0.75 * a.variances + 0.25 * b.variances + 0.1875 * delta ** 2, rtol=1e-5)


def daily_model(seed, phase, n=4000, d_metrics=5):
    """A device whose metrics follow a daily cycle at its own `phase`, learned with the two time inputs (sin, cos
    of the day) as its last inputs; full rank, so nothing is truncated."""
    rng = np.random.default_rng(seed)
    day = 2 * np.pi * np.arange(n) / 288
    T = np.column_stack([np.sin(day), np.cos(day)])
    mix = rng.normal(size=(2, d_metrics))
    M = np.sin(day + phase)[:, None] * np.abs(mix[0]) + rng.normal(size=(n, 1)) @ mix[1:] + 0.1 * rng.normal(
        size=(n, d_metrics))
    X = np.hstack([M, T])
    model = SubspaceModel(explained_variance=0.9, rank=X.shape[1], half_life=0)
    model.learn_many(X)
    return model, X


def conditional(weights, T):
    """The regression of the other inputs on the covariates T and the covariance left given them."""
    _, C = subspace_moments(weights)
    M = ~T
    shape = C[np.ix_(M, T)] @ np.linalg.inv(C[np.ix_(T, T)])
    return shape, C[np.ix_(M, M)] - shape @ C[np.ix_(T, M)]


def test_a_blend_given_the_time_of_day_leaves_out_only_the_disagreement_of_the_daily_shapes():
    (own, _), (fleet, _) = daily_model(1, phase=0.0), daily_model(2, phase=np.pi)
    T = np.zeros(7, dtype=bool)
    T[5:] = True
    local, other = own.get_weights(), fleet.get_weights()
    given = blend_weights(local, other, 0.4, own.architecture, covariates=T)
    mixed = blend_weights(local, other, 0.4, own.architecture)          # the plain blend: the mixture
    (mean_given, C_given), (mean_mixed, C_mixed) = subspace_moments(given), subspace_moments(mixed)
    np.testing.assert_allclose(mean_given, mean_mixed, atol=1e-5)                    # the mixture's means,
    np.testing.assert_allclose(C_given[:, T], C_mixed[:, T], atol=2e-4)               # time inputs, daily shape
    (shape_l, rest_l), (shape_g, rest_g) = conditional(local, T), conditional(other, T)
    delta = local[1][~T] - other[1][~T]
    np.testing.assert_allclose(conditional(given, T)[1], 0.6 * rest_l + 0.4 * rest_g + 0.24 * np.outer(delta, delta),
                               atol=2e-3)            # given the time of day: the two models' rest, mixed
    disagreement = conditional(mixed, T)[1] - conditional(given, T)[1]
    assert np.linalg.eigvalsh(disagreement).min() > -1e-3                     # what the plain blend adds ...
    assert np.linalg.eigvalsh(disagreement).max() > 0.1 * np.abs(shape_l - shape_g).max() ** 2   # ... is large


def test_a_blend_given_no_covariates_or_none_of_the_global_model_is_the_plain_blend_or_the_local_model():
    (own, _), (fleet, _) = daily_model(3, phase=0.0), daily_model(4, phase=1.0)
    local, other = own.get_weights(), fleet.get_weights()
    none = np.zeros(7, dtype=bool)
    for got, expected in zip(blend_weights(local, other, 0.3, own.architecture, covariates=none),
                             blend_weights(local, other, 0.3, own.architecture)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    T = np.arange(7) >= 5
    same = blend_weights(local, other, 0.0, own.architecture, covariates=T)
    np.testing.assert_allclose(same[0] @ same[0].T, local[0] @ local[0].T, atol=1e-5)
    np.testing.assert_allclose(same[1], local[1], atol=1e-6)
    np.testing.assert_allclose(same[2], local[2], rtol=1e-6)
    with pytest.raises(ValueError, match="covariate mask of 3 inputs"):
        blend_weights(local, other, 0.3, own.architecture, covariates=np.ones(3, dtype=bool))


@given(b=st.floats(0.0, 1.0), seed=st.integers(0, 50), rank=st.integers(2, 7))
@settings(max_examples=40, deadline=None)
def test_a_blend_given_covariates_is_finite_and_leaves_no_negative_variance(b, seed, rank):
    rng = np.random.default_rng(seed)

    def weights():
        L = rng.normal(size=(7, rank)).astype(np.float32)
        return [L, rng.normal(size=7).astype(np.float32),
                ((L.astype(np.float64) ** 2).sum(axis=1) + rng.uniform(0.0, 1.0, 7)).astype(np.float32)]

    factor, mean, var = blend_weights(weights(), weights(), b, f"subspace/7/r{rank}", covariates=np.arange(7) >= 5)
    assert factor.shape == (7, rank) and factor.dtype == np.float32
    assert np.isfinite(factor).all() and np.isfinite(mean).all()
    assert (var >= (factor.astype(np.float64) ** 2).sum(axis=1) * (1 - 1e-4) - 1e-5).all()
