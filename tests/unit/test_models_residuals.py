"""Blame shares: the largest shares per reading, as a stable sort orders them."""
import numpy as np
from hypothesis import given, settings, strategies as st

from models.residuals import largest_shares


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 12), st.integers(1, 5), st.integers(0, 99), st.booleans())
def test_largest_shares_order_as_a_stable_sort(n, m, k, seed, ties):
    """Positions and values of the k largest shares per row, largest first, ties to the lower position: the first
    k of a stable argsort of the negated shares (what the metrics to blame were before)."""
    rng = np.random.default_rng(seed)
    shares = rng.integers(0, 3, (n, m)) / 2.0 if ties else rng.random((n, m))
    before = shares.copy()
    top, values = largest_shares(shares, k)
    expected = np.argsort(-shares, axis=1, kind="stable")[:, :k]
    assert np.array_equal(top, expected)
    assert np.array_equal(values, np.take_along_axis(shares, expected, axis=1))
    assert np.array_equal(shares, before)          # the input is left as it was


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(1, 6), st.integers(0, 3), st.integers(1, 5), st.integers(0, 99))
def test_inputs_that_are_not_metrics_are_never_blamed(n, metrics, extra, blocks, seed):
    """With `metrics`, the columns after the metrics in each block (the time of day) get no share: the metrics'
    shares are those of the metric columns alone, and sum to 1 where those have any residual."""
    from models.residuals import metric_shares
    rng = np.random.default_rng(seed)
    normalised = rng.random((n, blocks * (metrics + extra)))
    shares = metric_shares(normalised, blocks, metrics)
    only_metrics = normalised.reshape(n, blocks, metrics + extra)[:, :, :metrics].reshape(n, -1)
    assert shares.shape == (n, metrics)
    np.testing.assert_allclose(shares, metric_shares(only_metrics, blocks))
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
