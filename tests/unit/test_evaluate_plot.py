"""The figure of `flead evaluate --plot`: its operating points and thinned curves."""
import numpy as np

from orchestration.evaluate_plot import operating_point, thinned


def test_operating_point_is_the_flags_false_positive_rate_recall_and_precision():
    y = np.array([1, 1, 0, 0, 0, 0])
    flags = np.array([1, 0, 1, 0, 0, 0])
    assert operating_point(y, flags) == (0.25, 0.5, 0.5)
    assert operating_point(y, np.zeros(6)) == (0.0, 0.0, 0.0)


def test_thinned_curves_keep_their_ends_and_stay_aligned():
    x = np.linspace(0, 1, 10_001)
    a, b = thinned(x, x ** 2, points=100)
    assert len(a) <= 101 and a[0] == 0.0 and a[-1] == 1.0
    np.testing.assert_array_equal(b, a ** 2)
    short = np.arange(5.0)
    assert thinned(short, points=100)[0] is short
