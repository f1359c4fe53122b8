"""Detection metrics in NumPy: threshold metrics, ranking metrics, point adjustment, delays and the NAB score.

Which numbers are honest:

- ``precision``/``recall``/``f1`` at an operating threshold chosen without test labels: what a deployment gets.
- ``roc_auc`` and ``pr_auc`` (average precision): threshold-free ranking quality. PR-AUC is the one to read
  when anomalies are rare; its chance level is the anomaly rate, not 0.5.
- ``best_f1``: the best F1 over every threshold. It picks the threshold with the test labels, so it is an
  UPPER BOUND on what any threshold rule can reach, never an operating result.
- ``f1_point_adjusted``: point adjustment marks a whole anomalous segment as found if any point in it is
  flagged. It inflates scores (random scores reach F1 ≈ 0.6-0.9 on ASD-like data); report it only beside the
  unadjusted numbers.

Convention: a reading is flagged when ``score > threshold``; ``threshold`` may be one number or one per reading
(e.g. each device's own threshold when a fleet's scores are pooled).

>>> y = np.array([0, 0, 1, 1, 0])
>>> s = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
>>> roc_auc(y, s), round(average_precision(y, s), 3)
(0.8333333333333334, 0.833)
>>> precision_recall_f1(y, s, threshold=0.3)
(0.6666666666666666, 1.0, 0.8)
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def _as_binary(y_true) -> np.ndarray:
    y = np.asarray(y_true).astype(int).ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def precision_recall_f1_from_predictions(y_true, y_pred) -> tuple[float, float, float]:
    """Precision, recall, F1 of binary predictions (0 when undefined, as sklearn's ``zero_division=0``)."""
    y, p = _as_binary(y_true), _as_binary(y_pred)
    tp = float(np.sum((p == 1) & (y == 1)))
    return _prf(tp, float(np.sum((p == 1) & (y == 0))), float(np.sum((p == 0) & (y == 1))))


def precision_recall_f1(y_true, scores, threshold: float | np.ndarray) -> tuple[float, float, float]:
    """Precision, recall, F1 when readings with ``score > threshold`` are flagged."""
    return precision_recall_f1_from_predictions(y_true, np.asarray(scores) > threshold)


def _descending_counts(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP when flagging the top scores, one entry per distinct score (ties together)."""
    y = _as_binary(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tps = np.cumsum(y)[last_of_tie].astype(np.float64)
    fps = (last_of_tie + 1 - tps).astype(np.float64)
    return tps, fps, s[last_of_tie]


def best_f1(y_true, scores) -> dict[str, float]:
    """The best F1 over all thresholds, with its precision, recall and threshold. Uses the labels: UPPER BOUND."""
    tps, fps, thresholds = _descending_counts(y_true, scores)
    positives = tps[-1] if len(tps) else 0.0
    if positives == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": math.inf}
    precision = tps / (tps + fps)
    recall = tps / positives
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    i = int(np.argmax(f1))
    # Flagging scores ≥ thresholds[i] is flagging scores > the next lower distinct score.
    below = thresholds[i + 1] if i + 1 < len(thresholds) else -math.inf
    return {"f1": float(f1[i]), "precision": float(precision[i]), "recall": float(recall[i]),
            "threshold": float(below)}


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); NaN when only one class is present."""
    y = _as_binary(y_true)
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s) != 0) + 1]
    ends = np.r_[starts[1:], len(s)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0   # mean of 1-based ranks start+1 .. end
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranking_curves(y_true, scores) -> dict[str, np.ndarray]:
    """ROC and precision-recall curves, one point per distinct score from the highest down: ``fpr``, ``tpr``
    (starting at 0, 0), ``precision``, ``recall``. Their areas are `roc_auc` (trapezoids) and
    `average_precision` (steps). Empty arrays when a class is missing."""
    tps, fps, _ = _descending_counts(y_true, scores)
    if len(tps) == 0 or tps[-1] == 0 or fps[-1] == 0:
        return {k: np.zeros(0) for k in ("fpr", "tpr", "precision", "recall")}
    return {"fpr": np.r_[0.0, fps / fps[-1]], "tpr": np.r_[0.0, tps / tps[-1]],
            "precision": tps / (tps + fps), "recall": tps / tps[-1]}


def average_precision(y_true, scores) -> float:
    """PR-AUC as average precision, Σ (Rₖ − Rₖ₋₁) Pₖ over distinct thresholds (sklearn's definition)."""
    tps, fps, _ = _descending_counts(y_true, scores)
    if len(tps) == 0 or tps[-1] == 0:
        return math.nan
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def anomaly_segments(y_true) -> list[tuple[int, int]]:
    """Runs of consecutive 1s as ``(start, end)`` index pairs, end exclusive."""
    y = np.r_[0, _as_binary(y_true), 0]
    edges = np.flatnonzero(np.diff(y))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def point_adjust(y_true, y_pred) -> np.ndarray:
    """Predictions with every anomalous segment fully flagged if any of its points is flagged."""
    adjusted = _as_binary(y_pred).copy()
    for start, end in anomaly_segments(y_true):
        if adjusted[start:end].any():
            adjusted[start:end] = 1
    return adjusted


def f1_point_adjusted(y_true, scores, threshold: float | np.ndarray) -> float:
    """F1 after `point_adjust` at ``score > threshold``. Inflated by design: report only beside plain F1."""
    y = _as_binary(y_true)
    return precision_recall_f1_from_predictions(y, point_adjust(y, np.asarray(scores) > threshold))[2]


def detection_delays(y_true, y_pred) -> list[int | None]:
    """Per anomalous segment, readings from its start to the first flag inside it (None: missed)."""
    p = _as_binary(y_pred)
    delays: list[int | None] = []
    for start, end in anomaly_segments(y_true):
        hits = np.flatnonzero(p[start:end])
        delays.append(int(hits[0]) if len(hits) else None)
    return delays


def detection_metrics(y_true, scores, threshold: float | np.ndarray) -> dict[str, float]:
    """All the numbers of a results table for one model (see the module docstring for which are honest)."""
    return detection_metrics_from_flags(y_true, scores, np.asarray(scores) > threshold)


def detection_metrics_from_flags(y_true, scores, flags) -> dict[str, float]:
    """`detection_metrics` when the operating flags come from elsewhere (e.g. a detector's own online threshold):
    ranking metrics from `scores`, threshold metrics from `flags`."""
    y = _as_binary(y_true)
    flags = _as_binary(flags)
    precision, recall, f1 = precision_recall_f1_from_predictions(y, flags)
    delays = [d for d in detection_delays(y, flags) if d is not None]
    return {"roc_auc": roc_auc(y, scores), "pr_auc": average_precision(y, scores),
            "f1": f1, "precision": precision, "recall": recall, "best_f1": best_f1(y, scores)["f1"],
            "f1_pa": precision_recall_f1_from_predictions(y, point_adjust(y, flags))[2],
            "mean_delay": float(np.mean(delays)) if delays else math.nan}


# ---------------------------------------------------------------- events: incidents and composite F1

def flag_groups(flags, gap_readings: int) -> list[tuple[int, int]]:
    """Incidents as `models.incidents.IncidentTracker` forms them (by readings): runs of flags in which at most
    `gap_readings` unflagged readings separate consecutive flags, as ``(first flag, last flag + 1)`` pairs."""
    positions = np.flatnonzero(_as_binary(flags))
    if positions.shape[0] == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) > gap_readings + 1)
    starts = np.r_[positions[0], positions[breaks + 1]]
    ends = np.r_[positions[breaks], positions[-1]] + 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def event_counts(y_true, flags, gap_readings: int) -> dict[str, int]:
    """What the event-level metrics count on one series (sum them over devices to pool a fleet).

    ``incidents``: groups of flags (`flag_groups`); ``true_incidents``: those overlapping a labelled anomaly
    range; ``ranges``: labelled ranges; ``detected_ranges``: ranges an incident overlaps; ``ranges_flagged``:
    ranges with at least one flagged reading; ``flagged`` / ``true_flagged``: flagged readings, and those inside
    a range (for point-wise precision)."""
    y, flags = _as_binary(y_true), _as_binary(flags)
    ranges = anomaly_segments(y)
    incidents = flag_groups(flags, gap_readings)
    inside = np.r_[0, np.cumsum(y)]  # labelled readings before each index
    true_incidents = sum(1 for a, b in incidents if inside[b] > inside[a])
    covered = np.zeros(len(y) + 1, dtype=np.int64)  # readings inside some incident's span, as a prefix count
    for a, b in incidents:
        covered[a] += 1
        covered[b] -= 1
    in_incident = np.r_[0, np.cumsum((np.cumsum(covered[:-1]) > 0).astype(np.int64))]
    flagged_before = np.r_[0, np.cumsum(flags)]
    return {"incidents": len(incidents), "true_incidents": true_incidents, "ranges": len(ranges),
            "detected_ranges": sum(1 for a, b in ranges if in_incident[b] > in_incident[a]),
            "ranges_flagged": sum(1 for a, b in ranges if flagged_before[b] > flagged_before[a]),
            "flagged": int(flags.sum()), "true_flagged": int((flags & y).sum())}


def event_metrics(counts: Mapping[str, int]) -> dict[str, float]:
    """Incident precision / recall / F1 and the composite F1 from (pooled) `event_counts`.

    An incident is true when it overlaps a labelled range; a range is detected when an incident overlaps it.
    The composite F1 (Garg et al., "An evaluation of anomaly detection and diagnosis in multivariate time
    series", IEEE TNNLS 2021) combines the event-wise recall (ranges with a flagged reading) with the point-wise
    precision (flagged readings that are anomalous): it rewards finding each event without rewarding long
    events more, and, unlike point adjustment, charges every false flag.

    >>> y = np.array([0, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    >>> flags = np.array([0, 1, 0, 1, 0, 0, 0, 0, 0, 1])
    >>> m = event_metrics(event_counts(y, flags, gap_readings=1))
    >>> m["incident_precision"], m["incident_recall"], m["composite_f1"]
    (0.5, 0.5, 0.4)
    """
    incident_precision = counts["true_incidents"] / counts["incidents"] if counts["incidents"] else 0.0
    incident_recall = counts["detected_ranges"] / counts["ranges"] if counts["ranges"] else 0.0
    event_recall = counts["ranges_flagged"] / counts["ranges"] if counts["ranges"] else 0.0
    point_precision = counts["true_flagged"] / counts["flagged"] if counts["flagged"] else 0.0

    def harmonic(a: float, b: float) -> float:
        return 2 * a * b / (a + b) if a + b > 0 else 0.0

    return {"incident_precision": incident_precision, "incident_recall": incident_recall,
            "incident_f1": harmonic(incident_precision, incident_recall), "composite_f1": harmonic(
                point_precision, event_recall), "incidents": int(counts["incidents"])}


# ---------------------------------------------------------------- NAB

NAB_STANDARD_PROFILE = {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}
NAB_PROBATION_PERCENT = 0.15   # NAB ignores the first 15 % of each file (at most 750 points): learning time


def nab_scaled_sigmoid(relative_position: np.ndarray) -> np.ndarray:
    """NAB's reward for a detection at a relative position: 2·sigmoid(−5x) − 1, and −1 from x ≥ 3 on.

    x = −1 is a window's left edge (≈ 0.987), x = 0 its right edge (0), x > 0 after the window (a false
    positive that costs more the further it is from the window).
    """
    x = np.asarray(relative_position, dtype=np.float64)
    return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0)


def nab_probation_length(n: int, probation_percent: float = NAB_PROBATION_PERCENT) -> int:
    """Leading points NAB does not score: min(⌊0.15·n⌋, 0.15·5000)."""
    return int(min(math.floor(probation_percent * n), probation_percent * 5000))


def nab_point_rewards(n: int, windows: Sequence[tuple[int, int]], profile: Mapping[str, float],
                      probation_percent: float = NAB_PROBATION_PERCENT) -> tuple[np.ndarray, np.ndarray]:
    """Each point's weighted reward if flagged, and its window index (−1 outside windows, −2 probationary).

    ``windows`` are inclusive ``(first, last)`` index pairs in time order. Inside a window the reward is
    ``scaled_sigmoid(−(last − i + 1)/width) · tpWeight / scaled_sigmoid(−1)``; outside it is
    ``scaled_sigmoid(|i − last of previous window| / (previous width − 1)) · fpWeight``, or ``−fpWeight`` before
    the first window (as in NAB's ``sweeper.py``).
    """
    max_tp = float(nab_scaled_sigmoid(-1.0))
    reward = np.empty(n)
    window_of = np.full(n, -1)
    index = np.arange(n)
    previous_last, previous_width = None, None
    cursor = 0
    for w, (first, last) in enumerate(list(windows) + [(n, n)]):
        gap = index[cursor:first]
        if previous_last is None:
            reward[cursor:first] = -profile["fpWeight"]
        else:
            position = np.abs(previous_last - gap) / max(previous_width - 1, 1)
            reward[cursor:first] = nab_scaled_sigmoid(position) * profile["fpWeight"]
        if first >= n:
            break
        width = last - first + 1
        inside = index[first:last + 1]
        reward[first:last + 1] = nab_scaled_sigmoid(-(last - inside + 1) / width) * profile["tpWeight"] / max_tp
        window_of[first:last + 1] = w
        previous_last, previous_width, cursor = last, width, last + 1
    window_of[:nab_probation_length(n, probation_percent)] = -2
    return reward, window_of


def _nab_raw(detected: np.ndarray, reward: np.ndarray, window_of: np.ndarray, fn_weight: float) -> tuple[float, int]:
    raw = float(reward[detected & (window_of == -1)].sum())
    windows = np.unique(window_of[window_of >= 0])
    for w in windows:
        hits = detected & (window_of == w)
        raw += float(reward[hits].max()) if hits.any() else -fn_weight
    return raw, len(windows)


def nab_score(series: Sequence[tuple[np.ndarray, Sequence[tuple[int, int]]]], threshold: float,
              profile: Mapping[str, float] = NAB_STANDARD_PROFILE,
              probation_percent: float = NAB_PROBATION_PERCENT) -> dict[str, float]:
    """NAB score of a corpus at one threshold (flag ``score ≥ threshold``, NAB's convention).

    ``series``: per data file, its scores and inclusive window index pairs. The raw score sums, over files,
    the rewards of false positives plus, per window, the best reward of its detections (the earliest) or
    ``−fnWeight`` when missed. It is normalised as NAB does, ``100 · (raw − null) / (perfect − null)``: the null
    detector (never flags) scores 0, the perfect one (flags each window's first point) 100. Pass
    ``probation_percent=0`` when the series already start after NAB's probationary period.
    """
    raw, n_windows = 0.0, 0
    for scores, windows in series:
        scores = np.asarray(scores, dtype=np.float64)
        reward, window_of = nab_point_rewards(len(scores), windows, profile, probation_percent)
        file_raw, file_windows = _nab_raw(scores >= threshold, reward, window_of, profile["fnWeight"])
        raw += file_raw
        n_windows += file_windows
    null, perfect = -profile["fnWeight"] * n_windows, profile["tpWeight"] * n_windows
    normalised = 100.0 * (raw - null) / (perfect - null) if perfect > null else math.nan
    return {"score": normalised, "raw": raw, "null": null, "perfect": perfect, "threshold": float(threshold)}


def nab_score_optimised(series: Sequence[tuple[np.ndarray, Sequence[tuple[int, int]]]],
                        profile: Mapping[str, float] = NAB_STANDARD_PROFILE, candidates: int = 200,
                        probation_percent: float = NAB_PROBATION_PERCENT) -> dict[str, float]:
    """NAB score at the one corpus-wide threshold that maximises it, as NAB's own optimiser does.

    This is the protocol behind the published scoreboard (random ≈ 11 on the full corpus). The threshold is
    chosen with the labels, so it is an upper bound on an operating threshold, like `best_f1`.
    """
    pooled = np.sort(np.concatenate([np.asarray(s, dtype=np.float64) for s, _ in series]))[::-1]
    # Candidates flag the top k points for k spaced geometrically: the optimum usually flags very few points.
    flagged = np.unique(np.geomspace(1, len(pooled), candidates).astype(int))
    thresholds = np.r_[np.unique(pooled[flagged - 1]), np.inf]
    results = [nab_score(series, t, profile, probation_percent) for t in thresholds]
    return max(results, key=lambda r: r["score"])
