"""Per-feature running standardisation."""
from __future__ import annotations

import numpy as np


class RunningScaler:
    """Standardise features with their running mean and variance, updated one reading or one batch at a time.

    Single readings use Welford's update; batches are merged with Chan et al.'s parallel formula (1979), so
    ``learn_many(X)`` gives the same state as ``learn_one`` on every row, up to rounding, without a Python loop.

    No unit is assumed: a feature that has been constant so far (standard deviation at most ``min_std`` times its
    mean's magnitude: rounding) has no scale yet. `transform_batch` measures a batch it has not learned against
    the spread such a feature has once the batch is included, so a metric constant over n readings that moves by
    any amount in one reading scores about sqrt(n) standard deviations, in any unit; `winsorise` leaves it
    unclipped (there is no scale to bound its first move by). Values a feature keeps constant stay 0.

    Parameters
    ----------
    min_std
        Relative rounding level: a standard deviation at most this times ``|mean|`` counts as constant.

    >>> import numpy as np
    >>> scaler = RunningScaler()
    >>> scaler.learn_many(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> scaler.learn_one(np.array([5.0, 5.0]))
    >>> scaler.mean.tolist(), scaler.var.tolist()
    ([3.0, 5.0], [2.6666666666666665, 0.0])
    >>> scaler.transform_one(np.array([5.0, 6.0])).round(3).tolist()
    [1.225, 1.0]
    >>> scaler.transform_batch(np.array([[5.0, 6.0]])).round(3).tolist()  # 5, 5, 5, 6: std 0.433
    [[1.225, 2.309]]
    >>> RunningScaler.from_array(scaler.to_array()).mean.tolist()
    [3.0, 5.0]
    """

    def __init__(self, min_std: float = 1e-12):
        self.min_std = float(min_std)
        self.n = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of squared deviations from the mean
        self._scale: tuple[np.ndarray, np.ndarray] | None = None  # (`std`, constant so far), until the next update
        self._pinned: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (columns, mean, variance): `pin`

    def pin(self, columns: np.ndarray, mean: np.ndarray | float, variance: np.ndarray | float) -> None:
        """Keep the features `columns` at known moments, whatever is learned: for inputs whose distribution is
        known a priori (the sine and cosine of the time of day: mean 0, variance 1/2 over a day), which a device
        that has seen part of a day would otherwise scale by the spread of that part. Not stored by `to_array`:
        the owner pins again after restoring."""
        columns = np.asarray(columns, dtype=np.intp)
        self._pinned = (columns, np.broadcast_to(np.asarray(mean, dtype=np.float64), columns.shape),
                        np.broadcast_to(np.asarray(variance, dtype=np.float64), columns.shape))
        self._hold_pinned()

    def _hold_pinned(self) -> None:
        if self._pinned is not None and self.mean is not None:
            columns, mean, variance = self._pinned
            self.mean[columns], self._m2[columns] = mean, variance * self.n
            self._scale = None

    def _init(self, d: int) -> None:
        self.mean = np.zeros(d)
        self._m2 = np.zeros(d)

    @property
    def var(self) -> np.ndarray:
        """Population variance of each feature (0 before two readings)."""
        return self._m2 / self.n if self.n else np.zeros_like(self._m2)

    @property
    def std(self) -> np.ndarray:
        """The divisor used by `transform`: the standard deviation, or 1 where the feature has been constant (its
        values minus the mean are then 0, up to rounding)."""
        return self._scaled()[0].copy()

    def _constant(self, std: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
        return std <= self.min_std * (0.0 if mean is None else np.abs(mean))

    def learn_one(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.mean is None:
            self._init(x.shape[0])
        self.n += 1
        self._scale = None
        delta = x - self.mean
        self.mean += delta / self.n
        self._m2 += delta * (x - self.mean)
        self._hold_pinned()

    def learn_many(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] == 0:
            return
        if self.mean is None:
            self._init(X.shape[1])
        self.n, self.mean, self._m2 = _merge(self.n, self.mean, self._m2, X)
        self._scale = None
        self._hold_pinned()

    def winsorise(self, X: np.ndarray, sigmas: float, min_readings: int) -> tuple[np.ndarray, int]:
        """`X` with each value clipped to ``mean ± sigmas · std`` of what the scaler has learned, and how many
        values were clipped; `X` itself until `min_readings` readings were learned. A detector learns from this
        copy, so one absurd but finite value (1e20) cannot blow up the scale every later reading is judged by."""
        if self.mean is None or self.n < min_readings:
            return X, 0
        divisor, constant = self._scaled()
        reach = np.where(constant, np.inf, sigmas * divisor)
        low, high = self.mean - reach, self.mean + reach
        outside = (X < low) | (X > high)
        if not outside.any():
            return X, 0
        return np.clip(X, low, high), int(np.count_nonzero(outside))

    def rebaseline(self, readings: int) -> None:
        """Weigh everything learned so far as `readings` readings at most (same mean and variance), so that what
        comes next dominates: after a drift, the new regime's scale is learned within about that many readings."""
        if self.n > readings > 0:
            self._m2 = self._m2 * (readings / self.n)
            self.n = readings
            self._scale = None

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """What `transform_many` scales by now: (mean, divisor, constant so far); None before the first reading.
        `conversion` maps values scaled in one such state to another."""
        if self.mean is None:
            return None
        divisor, constant = self._scaled()
        return self.mean.copy(), divisor, constant

    def transform_one(self, x: np.ndarray) -> np.ndarray:
        return self.transform_many(np.asarray(x, dtype=np.float64)[None, :])[0]

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        """Standardised copy of `X`; the identity before the first reading."""
        X = np.asarray(X, dtype=np.float64)
        if self.mean is None:
            return X.copy()
        return (X - self.mean) / self._scaled()[0]

    def transform_batch(self, X: np.ndarray) -> np.ndarray:
        """Standardised copy of a batch `X`, with no unit assumed: a feature constant so far is divided by its
        standard deviation over what was learned and `X` together (Chan's merge), a first batch by its own mean
        and spread, and a feature that stays constant is 0 (not its rounding noise, which depends on the unit)."""
        X = np.asarray(X, dtype=np.float64)
        if self.mean is None:  # nothing learned: every feature is constant so far
            first = RunningScaler(self.min_std)
            first._pinned = self._pinned
            first.learn_many(X)
            return first.transform_batch(X)
        divisor, constant = self._scaled()
        scaled = (X - self.mean) / divisor
        if constant.any():
            columns = X[:, constant]
            n, mean, m2 = _merge(self.n, self.mean[constant], self._m2[constant], columns)
            merged = np.sqrt(m2 / n)
            still = self._constant(merged, mean)
            scaled[:, constant] = np.where(still, 0.0, (columns - self.mean[constant]) / np.where(still, 1.0, merged))
        return scaled

    def _scaled(self) -> tuple[np.ndarray, np.ndarray]:
        """`std` and which features have been constant so far, computed once per update (every batch is
        transformed twice, for scoring and for learning, and winsorised). Do not modify the results."""
        if self._scale is None:
            std = np.sqrt(self.var)
            constant = self._constant(std, self.mean)
            self._scale = (np.where(constant, 1.0, std), constant)
        return self._scale

    def to_array(self) -> np.ndarray:
        """State as one flat float64 array: ``[min_std, n, d, mean..., m2...]``."""
        d = 0 if self.mean is None else self.mean.shape[0]
        parts = [np.array([self.min_std, self.n, d], dtype=np.float64)]
        if d:
            parts += [self.mean, self._m2]
        return np.concatenate(parts)

    @classmethod
    def from_array(cls, state: np.ndarray) -> "RunningScaler":
        state = np.asarray(state, dtype=np.float64)
        scaler = cls(min_std=state[0])
        scaler.n, d = int(state[1]), int(state[2])
        if d:
            scaler.mean = state[3:3 + d].copy()
            scaler._m2 = state[3 + d:3 + 2 * d].copy()
        return scaler


def conversion(before: tuple[np.ndarray, np.ndarray, np.ndarray],
               after: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per feature (a, c) such that a value scaled in the `units` ``before`` is ``a · value + c`` scaled in the
    units ``after``. A feature constant before was scaled to 0 (its one value, the mean), so what was learned of
    it has no spread to stretch: a = 1 (a factor of 1/std in the new units would depend on the metric's unit and
    magnify rounding), and c is where that value lies in the new units.

    >>> scaler = RunningScaler()
    >>> scaler.learn_many(np.array([[0.0], [2.0]]))                         # mean 1, std 1
    >>> before, z = scaler.units(), scaler.transform_one(np.array([3.0]))  # 3.0 is 2 std above
    >>> scaler.learn_many(np.array([[4.0], [6.0]]))                         # mean 3, std 5 ** 0.5
    >>> a, c = conversion(before, scaler.units())
    >>> (a * z + c).round(12).tolist(), scaler.transform_one(np.array([3.0])).tolist()
    ([0.0], [0.0])
    """
    mean_before, divisor_before, constant_before = before
    mean_after, divisor_after, _ = after
    return (np.where(constant_before, 1.0, divisor_before / divisor_after),
            (mean_before - mean_after) / divisor_after)


def _merge(n: int, mean: np.ndarray, m2: np.ndarray, X: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and sum of squared deviations of what (`n`, `mean`, `m2`) summarises and the rows of `X`
    together (Chan, Golub & LeVeque's parallel update)."""
    n_b = X.shape[0]
    mean_b = np.add.reduce(X, axis=0) / n_b
    deviations = X - mean_b
    m2_b = np.add.reduce(deviations * deviations, axis=0)
    total = n + n_b
    delta = mean_b - mean
    if not n:  # nothing before: no mean-shift term (and no 0 * inf from a huge first mean)
        return total, mean_b, m2 + m2_b
    return total, mean + delta * (n_b / total), m2 + m2_b + delta * delta * (n * n_b / total)
