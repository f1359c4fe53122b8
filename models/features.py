"""Online feature engineering and the policy for missing (non-finite) metric values."""
from __future__ import annotations

from typing import Sequence

import numpy as np

NAN_POLICIES = ("impute", "reject")
MAX_ABS_INPUT = 1e100
"""Largest magnitude a metric value may have: the models square values and add up many squares (a variance, a
covariance, squared residuals), which must stay finite in float64 (1e154 squared overflows; 1e100 leaves room for
sums of 10^100 squares). Beyond it a value counts as missing, like NaN and ±inf; the wire refuses it
(`telemetry.schema`)."""


DAY_MS = 86_400_000
TIME_OF_DAY_MEAN, TIME_OF_DAY_VARIANCE = 0.0, 0.5  # of the sine and cosine of any harmonic of a phase uniform over
#                                                    the day


def time_of_day_inputs(harmonics: int = 1) -> list[str]:
    """The inputs `model.features.time_of_day` adds after a reading's metrics (`time_of_day`): ``time_of_day:sin``,
    ``time_of_day:cos``, then ``time_of_day:sin2``, ``time_of_day:cos2``... up to `harmonics`."""
    return [f"time_of_day:{f}{'' if k == 1 else k}" for k in range(1, harmonics + 1) for f in ("sin", "cos")]


def time_of_day(ts: Sequence[int] | np.ndarray, harmonics: int = 1) -> np.ndarray:
    """(n, 2 × harmonics): sine and cosine of k × each event time's phase in its UTC day, k = 1…harmonics (`ts` in
    epoch ms). Server load follows the clock; with these inputs a linear model can tell a level usual at this hour
    from one usual at another, and a daily cycle that stops (any fixed time-zone offset is a phase shift it absorbs);
    more harmonics let it follow a daily shape that is not a sine (a Fourier series of the day).

    >>> time_of_day([0, 6 * 3600 * 1000]).round(6).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    >>> time_of_day([6 * 3600 * 1000], harmonics=2).round(6).tolist()
    [[1.0, 0.0, 0.0, -1.0]]
    """
    if harmonics < 1:
        raise ValueError(f"model.features.time_of_day_harmonics must be >= 1, got {harmonics}")
    phase = (2.0 * np.pi / DAY_MS) * np.mod(np.asarray(ts, dtype=np.int64), DAY_MS)
    angles = phase[:, None] * np.arange(1, harmonics + 1)
    return np.stack([np.sin(angles), np.cos(angles)], axis=2).reshape(len(phase), 2 * harmonics)


def readings_per_day(ts: Sequence[int] | np.ndarray) -> int:
    """Readings in one day at the median interval of the event times `ts` (epoch ms); ValueError when they do not
    advance.

    >>> readings_per_day([0, 300_000, 600_000, 1_500_000])
    288
    """
    steps = np.diff(np.asarray(ts, dtype=np.int64))
    steps = steps[steps > 0]
    if steps.size == 0:
        raise ValueError("the event times do not advance: no interval, so no day")
    return max(1, int(round(DAY_MS / float(np.median(steps)))))


class NonFiniteMetricError(ValueError):
    """A missing metric value (NaN, ±inf, or beyond ±`MAX_ABS_INPUT`) under ``model.nan_policy = reject``."""


def usable(X: np.ndarray) -> np.ndarray:
    """Which values the models can take: finite and at most `MAX_ABS_INPUT` in magnitude (NaN compares False)."""
    return np.abs(X) <= MAX_ABS_INPUT


class FeatureBuilder:
    """Turn each reading into features: the raw metrics, then rolling means and standard deviations, lagged
    values and the rate of change of every metric, from a small buffer of the last readings.

    Missing values (NaN, ±inf, and magnitudes beyond `MAX_ABS_INPUT`) are handled first, by `nan_policy`:

    - ``impute``: replace with the metric's last finite value (carried across batches); a metric never yet
      finite takes the mean of its finite values in the same batch, else 0. Every replaced value is counted in
      `n_imputed`.
    - ``reject``: raise `NonFiniteMetricError` naming the metric and the row.

    At the start of a stream the windows are partial: a rolling statistic uses the readings seen so far, a lag
    not yet available repeats the current value (and the rate of change is 0).

    ``transform_*`` never changes the state; ``learn_*`` appends the readings to the buffer (River's split).
    Output columns are ordered metric-major per block: raw, then (mean, std) per window, then lags, then rate.

    Parameters
    ----------
    metric_names
        Names of the input columns; default ``m0, m1, ...`` (lazily, from the first reading).
    rolling_windows
        Window lengths (readings) of rolling mean and std, e.g. ``(6, 24)``.
    lags
        Lags (readings) whose values are added, e.g. ``(1,)``.
    rate_of_change
        Add ``x_t - x_{t-1}``.
    nan_policy
        ``impute`` or ``reject``.

    >>> import numpy as np
    >>> fb = FeatureBuilder(["cpu"], rolling_windows=(2,), lags=(1,), rate_of_change=True)
    >>> fb.feature_names
    ['cpu', 'cpu:mean2', 'cpu:std2', 'cpu:lag1', 'cpu:roc']
    >>> fb.learn_many(np.array([[1.0], [3.0]]))
    >>> fb.transform_one(np.array([np.nan])).tolist()      # imputed as 3.0
    [3.0, 3.0, 0.0, 3.0, 0.0]
    >>> fb.transform_one(np.array([5.0])).tolist()
    [5.0, 4.0, 1.0, 3.0, 2.0]
    >>> fb.learn_one(np.array([np.nan])); fb.n_imputed
    1
    """

    def __init__(self, metric_names: Sequence[str] | None = None, rolling_windows: Sequence[int] = (),
                 lags: Sequence[int] = (), rate_of_change: bool = False, nan_policy: str = "impute"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"model.nan_policy: unknown policy {nan_policy!r} (known: {', '.join(NAN_POLICIES)})")
        bad = [n for n in (*rolling_windows, *lags) if int(n) < 1]
        if bad:
            raise ValueError(f"model.features: windows and lags must be >= 1, got {bad}")
        self.metric_names = list(metric_names) if metric_names is not None else None
        self.rolling_windows = tuple(int(w) for w in rolling_windows)
        self.lags = tuple(int(lag) for lag in lags)
        self.rate_of_change = bool(rate_of_change)
        self.nan_policy = nan_policy
        # Readings kept: enough for the longest window, the largest lag and the rate of change.
        self.memory = max([w - 1 for w in self.rolling_windows] + list(self.lags) + [int(self.rate_of_change)])
        self.n_imputed = 0
        self._last_finite: np.ndarray | None = None  # per metric; NaN while never finite
        self._recent: np.ndarray | None = None       # last `memory` clean readings, oldest first

    @property
    def n_metrics(self) -> int | None:
        return None if self.metric_names is None else len(self.metric_names)

    @property
    def blocks(self) -> int:
        """Features per metric."""
        return 1 + 2 * len(self.rolling_windows) + len(self.lags) + int(self.rate_of_change)

    @property
    def n_features(self) -> int:
        return self.blocks * self.n_metrics

    @property
    def feature_names(self) -> list[str]:
        suffixes = [""] + [f":{s}{w}" for w in self.rolling_windows for s in ("mean", "std")]
        suffixes += [f":lag{lag}" for lag in self.lags] + [":roc"] * self.rate_of_change
        return [f"{m}{s}" for s in suffixes for m in self.metric_names]

    def value_columns(self, inputs: Sequence[int]) -> np.ndarray:
        """The output columns holding the values of the input columns `inputs` themselves: the reading's and its
        lags' (not rolling statistics or rates of change)."""
        first_lag = 1 + 2 * len(self.rolling_windows)
        blocks = [0, *range(first_lag, first_lag + len(self.lags))]
        return np.array([b * self.n_metrics + i for b in blocks for i in inputs], dtype=np.intp)

    @property
    def metric_of_feature(self) -> np.ndarray:
        """Index of the metric each output column is derived from."""
        return np.tile(np.arange(self.n_metrics), self.blocks)

    def _setup(self, d: int) -> None:
        if self.metric_names is None:
            self.metric_names = [f"m{i}" for i in range(d)]
        elif len(self.metric_names) != d:
            raise ValueError(f"expected {len(self.metric_names)} metrics ({', '.join(self.metric_names)}), got {d}")
        if self._last_finite is None:
            self._last_finite = np.full(d, np.nan)
            self._recent = np.zeros((0, d))

    def clean_many(self, X: np.ndarray) -> tuple[np.ndarray, int]:
        """`X` with missing values (`usable`: NaN, ±inf, beyond ±`MAX_ABS_INPUT`) replaced per `nan_policy` (`X`
        itself, as float64 rows, if it has none), and how many were replaced. No state change."""
        X = np.array(X, dtype=np.float64, ndmin=2, copy=None)
        self._setup(X.shape[1])
        finite = usable(X)
        if finite.all():
            return X, 0
        if self.nan_policy == "reject":
            row, col = np.argwhere(~finite)[0]
            raise NonFiniteMetricError(f"metric {self.metric_names[col]!r} is {X[row, col]} in row {row} "
                                       f"(missing, or beyond ±{MAX_ABS_INPUT:g}; model.nan_policy = reject)")
        # Forward fill: index of the latest finite row at or before each row, -1 if none in this batch.
        rows = np.where(finite, np.arange(X.shape[0])[:, None], -1)
        latest = np.maximum.accumulate(rows, axis=0)
        filled = np.take_along_axis(X, np.maximum(latest, 0), axis=0)
        with np.errstate(invalid="ignore"):
            batch_mean = np.where(finite, X, 0.0).sum(axis=0) / finite.sum(axis=0)
        before = np.where(np.isfinite(self._last_finite), self._last_finite, np.nan_to_num(batch_mean, nan=0.0))
        filled = np.where(latest >= 0, filled, before)
        return np.where(finite, X, filled), int((~finite).sum())

    def _features(self, clean: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
        """Features of the cleaned readings; `history` is ``_recent`` followed by `clean` (made if not given)."""
        if self.blocks == 1:  # raw metrics only
            return clean.copy()
        if history is None:
            history = np.concatenate((self._recent, clean))
        n, offset = clean.shape[0], self._recent.shape[0]
        rows = offset + np.arange(n)  # position of each new reading in `history`
        blocks = [clean]
        if self.rolling_windows:
            zero = np.zeros((1, history.shape[1]))
            csum = np.vstack([zero, np.cumsum(history, axis=0)])
            csq = np.vstack([zero, np.cumsum(history * history, axis=0)])
            for w in self.rolling_windows:
                start = np.maximum(rows - w + 1, 0)
                count = (rows + 1 - start)[:, None]
                mean = (csum[rows + 1] - csum[start]) / count
                var = (csq[rows + 1] - csq[start]) / count - mean * mean
                blocks += [mean, np.sqrt(np.maximum(var, 0.0))]
        if self.lags and offset >= max(self.lags):  # every lag available (after the first readings): slices
            blocks += [history[offset - lag:offset - lag + n] for lag in self.lags]
        else:
            blocks += [history[np.where(rows >= lag, rows - lag, rows)] for lag in self.lags]
        if self.rate_of_change:
            blocks.append(clean - history[np.maximum(rows - 1, 0)])
        return np.concatenate(blocks, axis=1)

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        """Features of each reading in `X` (in order, each seeing the earlier ones), shape (n, n_features)."""
        clean, _ = self.clean_many(X)
        return self._features(clean)

    def transform_one(self, x: np.ndarray) -> np.ndarray:
        return self.transform_many(np.asarray(x, dtype=np.float64)[None, :])[0]

    def transform_and_learn_many(self, X: np.ndarray) -> np.ndarray:
        """`transform_many(X)`, then `learn_many(X)`, cleaning `X` only once."""
        clean, n_replaced = self.clean_many(X)
        if not self.memory:
            features = self._features(clean)
            self._remember(X, clean, n_replaced)
            return features
        history = np.concatenate((self._recent, clean))
        features = self._features(clean, history)
        self._remember(X, clean, n_replaced, history)
        return features

    def learn_many(self, X: np.ndarray) -> None:
        """Remember the (cleaned) readings and count the imputed values."""
        self._remember(X, *self.clean_many(X))

    def _remember(self, X: np.ndarray, clean: np.ndarray, n_replaced: int, history: np.ndarray | None = None
                  ) -> None:
        """Take the readings `X`, cleaned by `clean_many` into `clean` with `n_replaced` values imputed (`history`:
        ``_recent`` followed by `clean`, if already made)."""
        self.n_imputed += n_replaced
        if n_replaced:
            seen = usable(np.array(X, dtype=np.float64, ndmin=2, copy=None)).any(axis=0)
            self._last_finite[seen] = clean[-1, seen]  # forward-filled, so the last finite value of each metric
        else:
            self._last_finite[:] = clean[-1]
        if self.memory:
            if history is None:
                history = np.concatenate((self._recent, clean))
            self._recent = history[-self.memory:]

    def learn_one(self, x: np.ndarray) -> None:
        self.learn_many(np.asarray(x, dtype=np.float64)[None, :])

    def to_array(self) -> np.ndarray:
        """``[policy, rate, n_windows, windows..., n_lags, lags..., d, n_imputed, n_recent, last_finite, recent]``."""
        d = 0 if self._last_finite is None else self._last_finite.shape[0]
        head = [NAN_POLICIES.index(self.nan_policy), int(self.rate_of_change), len(self.rolling_windows),
                *self.rolling_windows, len(self.lags), *self.lags, d, self.n_imputed]
        if not d:
            return np.array(head + [0], dtype=np.float64)
        return np.concatenate([np.array(head + [self._recent.shape[0]], dtype=np.float64),
                               self._last_finite, self._recent.ravel()])

    @classmethod
    def from_array(cls, state: np.ndarray, metric_names: Sequence[str] | None = None) -> "FeatureBuilder":
        s = [float(v) for v in state[:3]]
        n_windows = int(s[2])
        windows = [int(v) for v in state[3:3 + n_windows]]
        i = 3 + n_windows
        n_lags = int(state[i])
        lags = [int(v) for v in state[i + 1:i + 1 + n_lags]]
        i += 1 + n_lags
        d, n_imputed, n_recent = int(state[i]), int(state[i + 1]), int(state[i + 2])
        fb = cls(metric_names, windows, lags, bool(s[1]), NAN_POLICIES[int(s[0])])
        fb.n_imputed = n_imputed
        if d:
            fb._setup(d)
            i += 3
            fb._last_finite = np.array(state[i:i + d], dtype=np.float64)
            fb._recent = np.array(state[i + d:i + d + n_recent * d], dtype=np.float64).reshape(n_recent, d)
        return fb
