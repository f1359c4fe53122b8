"""Detection metrics against scikit-learn, point adjustment, delays and the NAB score."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, precision_score, recall_score, \
    roc_auc_score, roc_curve

from models.metrics import (NAB_STANDARD_PROFILE, anomaly_segments, average_precision, best_f1, detection_delays,
                            detection_metrics, f1_point_adjusted, nab_point_rewards, nab_scaled_sigmoid, nab_score,
                            nab_score_optimised, point_adjust, precision_recall_f1, ranking_curves, roc_auc)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@st.composite
def labelled_scores(draw):
    n = draw(st.integers(4, 60))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    # Few distinct values: ties are where hand-written metrics usually go wrong.
    s = np.array(draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)), dtype=float)
    return y, s


@settings(max_examples=80, deadline=None)
@given(labelled_scores())
def test_ranking_metrics_match_sklearn(data):
    y, s = data
    if y.min() == y.max():
        assert math.isnan(roc_auc(y, s))
        return
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


@settings(max_examples=80, deadline=None)
@given(labelled_scores())
def test_ranking_curves_are_sklearns_and_their_areas_are_the_aucs(data):
    y, s = data
    c = ranking_curves(y, s)
    if y.min() == y.max():
        assert all(len(v) == 0 for v in c.values())
        return
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(c["fpr"], fpr)
    np.testing.assert_allclose(c["tpr"], tpr)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc(y, s))
    assert np.sum(np.diff(np.r_[0.0, c["recall"]]) * c["precision"]) == pytest.approx(average_precision(y, s))


@settings(max_examples=80, deadline=None)
@given(labelled_scores(), st.floats(-1, 7))
def test_threshold_metrics_match_sklearn(data, threshold):
    y, s = data
    pred = (s > threshold).astype(int)
    p, r, f = precision_recall_f1(y, s, threshold)
    assert p == pytest.approx(precision_score(y, pred, zero_division=0))
    assert r == pytest.approx(recall_score(y, pred, zero_division=0))
    assert f == pytest.approx(f1_score(y, pred, zero_division=0))


@settings(max_examples=80, deadline=None)
@given(labelled_scores())
def test_best_f1_is_the_max_over_sklearn_curve_and_reachable(data):
    y, s = data
    if y.sum() == 0:
        return
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    best = best_f1(y, s)
    assert best["f1"] == pytest.approx(f1.max())
    assert precision_recall_f1(y, s, best["threshold"])[2] == pytest.approx(best["f1"])


def test_segments_point_adjustment_and_delays():
    y = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    p = np.array([0, 0, 0, 1, 0, 1, 0, 0, 0])
    assert anomaly_segments(y) == [(1, 4), (6, 8)]
    np.testing.assert_array_equal(point_adjust(y, p), [0, 1, 1, 1, 0, 1, 0, 0, 0])
    assert detection_delays(y, p) == [2, None]
    assert f1_point_adjusted(y, p.astype(float), 0.5) == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_point_adjustment_inflates_random_scores():
    rng = np.random.default_rng(0)
    y = np.zeros(5000, dtype=int)
    for start in range(200, 5000, 500):
        y[start:start + 100] = 1
    s = rng.random(5000)
    threshold = np.quantile(s, 0.99)
    assert f1_point_adjusted(y, s, threshold) > 0.5 > 3 * precision_recall_f1(y, s, threshold)[2]
    report = detection_metrics(y, s, threshold)
    assert set(report) >= {"roc_auc", "pr_auc", "f1", "precision", "recall", "best_f1", "f1_pa"}
    assert abs(report["roc_auc"] - 0.5) < 0.05


def test_nab_scaled_sigmoid_values_from_the_paper():
    np.testing.assert_allclose(nab_scaled_sigmoid(np.array([-1.0, -0.5, 0.0, 1.0, 3.0])),
                               [0.98661, 0.84828, 0.0, -0.98661, -1.0], atol=1e-5)


def test_nab_rewards_and_normalisation():
    n = 1000
    windows = [(400, 499), (800, 849)]
    reward, window_of = nab_point_rewards(n, windows, NAB_STANDARD_PROFILE)
    assert (window_of[:150] == -2).all()                       # probation: 15 %
    assert reward[400] == pytest.approx(1.0)                   # earliest detection: full tpWeight
    assert reward[300] == pytest.approx(-0.11)                 # before any window: −fpWeight
    perfect = np.zeros(n)
    perfect[[400, 800]] = 1.0
    assert nab_score([(perfect, windows)], 0.5)["score"] == pytest.approx(100.0)
    assert nab_score([(np.zeros(n), windows)], 0.5)["score"] == pytest.approx(0.0)
    late = np.zeros(n)
    late[[499, 849]] = 1.0                                     # last point of each window: reward ≈ 0
    assert 45 < nab_score([(late, windows)], 0.5)["score"] < 55
    every = np.ones(n)                                          # flags everything: heavy FP cost
    assert nab_score([(every, windows)], 0.5)["score"] < 0


def test_nab_random_detector_scores_near_the_published_baseline():
    """NAB's scoreboard gives random ≈ 11 (standard profile) on the full corpus; our subset should be close."""
    windows_file = DATA / "nab" / "labels" / "combined_windows.json"
    if not windows_file.is_file():
        pytest.skip("reference data not present")
    windows = json.loads(windows_file.read_text())
    rng = np.random.default_rng(0)
    series = []
    for key, spans in windows.items():
        path = DATA / "nab" / key
        if not path.is_file():
            continue
        ts = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=str)
        ts = np.array([t[:19] for t in ts], dtype="datetime64[s]")
        idx = [(int(np.searchsorted(ts, np.datetime64(a[:19]))), int(np.searchsorted(ts, np.datetime64(b[:19]), "right") - 1))
               for a, b in spans]
        series.append((rng.random(len(ts)), idx))
    result = nab_score_optimised(series)
    assert 5 < result["score"] < 25   # seeds 0-2 give 13.0, 17.0, 10.2


def test_event_metrics_pool_incidents_and_ranges():
    from models.metrics import event_counts, event_metrics, flag_groups
    y = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    flags = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert flag_groups(flags, gap_readings=1) == [(0, 1), (3, 4), (6, 7), (17, 18)]
    assert flag_groups(flags, gap_readings=2) == [(0, 7), (17, 18)]
    counts = event_counts(y, flags, gap_readings=1)
    assert counts == {"incidents": 4, "true_incidents": 1, "ranges": 2, "detected_ranges": 1, "ranges_flagged": 1,
                      "flagged": 4, "true_flagged": 1}
    m = event_metrics(counts)
    assert (m["incident_precision"], m["incident_recall"]) == (0.25, 0.5)
    assert m["composite_f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    wide = event_counts(y, flags, gap_readings=2)   # one incident spans the first range
    assert wide["detected_ranges"] == 1 and wide["true_incidents"] == 1 and wide["incidents"] == 2
    assert event_metrics({k: 0 for k in counts})["incident_f1"] == 0.0


def test_metrics_from_flags_equal_metrics_at_a_threshold():
    from models.metrics import detection_metrics, detection_metrics_from_flags
    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.1).astype(int)
    s = rng.random(500) + y
    a, b = detection_metrics(y, s, 0.9), detection_metrics_from_flags(y, s, s > 0.9)
    assert a == pytest.approx(b, nan_ok=True)
