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
