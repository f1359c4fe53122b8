"""Pairwise-masked secure aggregation."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.aggregation import Update, fedavg, flatten
from models.secure_aggregation import SecureAggregationSession, secure_fedavg


def vectors(n, length=50, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.normal(size=length) for i in range(n)}


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10 ** 6))
def test_sum_of_masked_vectors_is_the_true_sum(n, seed):
    data = vectors(n, seed=seed % 1000)
    session = SecureAggregationSession(list(data), 50, round_seed=seed)
    masked = {c: session.mask(c, v) for c, v in data.items()}
    np.testing.assert_allclose(session.unmasked_sum(masked), sum(data.values()), atol=1e-6)


def test_one_masked_vector_reveals_nothing():
    data = vectors(5)
    session = SecureAggregationSession(list(data), 50, round_seed=3)
    for client, vector in data.items():
        seen = session.mask(client, vector).view(np.int64).astype(np.float64) / 2 ** 24   # decoded as if plain
        assert np.abs(seen - vector).mean() > 1e6          # nowhere near the update
        assert abs(np.corrcoef(seen, vector)[0, 1]) < 0.5   # and not even correlated with it


def test_dropped_clients_masks_are_rebuilt():
    data = vectors(6)
    session = SecureAggregationSession(list(data), 50, round_seed=4)
    masked = {c: session.mask(c, v) for c, v in data.items() if c not in ("c2", "c5")}
    expected = sum(v for c, v in data.items() if c not in ("c2", "c5"))
    np.testing.assert_allclose(session.unmasked_sum(masked), expected, atol=1e-6)


def test_rejects_what_it_cannot_encode():
    session = SecureAggregationSession(["a", "b"], 2, round_seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        session.mask("a", np.array([np.nan, 0.0]))
    with pytest.raises(ValueError, match="not in this round"):
        session.mask("z", np.zeros(2))


def test_secure_fedavg_equals_fedavg():
    rng = np.random.default_rng(5)
    updates = [Update(f"d{i}", [rng.normal(size=(3, 2)), rng.normal(size=2)], int(rng.integers(1, 500)))
               for i in range(5)]
    np.testing.assert_allclose(flatten(secure_fedavg(updates, round_seed=1)),
                               flatten(fedavg([(u.weights, u.n_samples) for u in updates])), atol=1e-6)
