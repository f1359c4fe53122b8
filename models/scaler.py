"""Per-feature running standardisation."""
from __future__ import annotations

import numpy as np


class RunningScaler:
    """Standardise features with their running mean and variance, updated one reading or one batch at a time.

    Single readings use Welford's update; batches are merged with Chan et al.'s parallel formula (1979), so
    ``learn_many(X)`` gives the same state as ``learn_one`` on every row, up to rounding, without a Python loop.
    A feature whose standard deviation is below ``min_std`` (e.g. a metric that has been constant so far) is
    only centred, not divided, so it cannot blow up to huge values on its first change.

    Parameters
    ----------
    min_std
        Standard deviations below this are treated as 1.

    >>> import numpy as np
    >>> scaler = RunningScaler()
    >>> scaler.learn_many(np.array([[1.0, 5.0], [3.0, 5.0]]))
    >>> scaler.learn_one(np.array([5.0, 5.0]))
    >>> scaler.mean.tolist(), scaler.var.tolist()
    ([3.0, 5.0], [2.6666666666666665, 0.0])
    >>> scaler.transform_one(np.array([5.0, 6.0])).round(3).tolist()
    [1.225, 1.0]
    >>> RunningScaler.from_array(scaler.to_array()).mean.tolist()
    [3.0, 5.0]
    """

    def __init__(self, min_std: float = 1e-6):
        self.min_std = float(min_std)
        self.n = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of squared deviations from the mean
        self._divisor: np.ndarray | None = None  # `std`, cached until the next update

    def _init(self, d: int) -> None:
        self.mean = np.zeros(d)
        self._m2 = np.zeros(d)

    @property
    def var(self) -> np.ndarray:
        """Population variance of each feature (0 before two readings)."""
        return self._m2 / self.n if self.n else np.zeros_like(self._m2)

    @property
    def std(self) -> np.ndarray:
        """The divisor used by `transform`: the standard deviation, or 1 where it is below `min_std`."""
        std = np.sqrt(self.var)
        return np.where(std < self.min_std, 1.0, std)

    def learn_one(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.mean is None:
            self._init(x.shape[0])
        self.n += 1
        self._divisor = None
        delta = x - self.mean
        self.mean += delta / self.n
        self._m2 += delta * (x - self.mean)

    def learn_many(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] == 0:
            return
        if self.mean is None:
            self._init(X.shape[1])
        n_b = X.shape[0]
        mean_b = np.add.reduce(X, axis=0) / n_b
        deviations = X - mean_b
        m2_b = np.add.reduce(deviations * deviations, axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta * delta * (self.n * n_b / n)
        self.n = n
        self._divisor = None

    def winsorise(self, X: np.ndarray, sigmas: float, min_readings: int) -> tuple[np.ndarray, int]:
        """`X` with each value clipped to ``mean ± sigmas · std`` of what the scaler has learned, and how many
        values were clipped; `X` itself until `min_readings` readings were learned. A detector learns from this
        copy, so one absurd but finite value (1e20) cannot blow up the scale every later reading is judged by."""
        if self.mean is None or self.n < min_readings:
            return X, 0
        reach = sigmas * self._std()
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
            self._divisor = None

    def transform_one(self, x: np.ndarray) -> np.ndarray:
        return self.transform_many(np.asarray(x, dtype=np.float64)[None, :])[0]

    def transform_many(self, X: np.ndarray) -> np.ndarray:
        """Standardised copy of `X`; the identity before the first reading."""
        X = np.asarray(X, dtype=np.float64)
        if self.mean is None:
            return X.copy()
        return (X - self.mean) / self._std()

    def _std(self) -> np.ndarray:
        """`std`, cached until the next update. Do not modify the result."""
        if self._divisor is None:
            self._divisor = self.std
        return self._divisor

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
