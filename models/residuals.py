"""Per-dimension residual normalisation: a device's typical residual for each input, and the score built on it."""
from __future__ import annotations

import numpy as np

from models.subspace import batch_weights, forgetting_factor


class ResidualScale:
    """Each input dimension's typical residual on this device (an RMS with forgetting); the anomaly score divides
    every residual by it before averaging the squares.

    A plain mean squared reconstruction error is dominated by the few inputs whose residuals are naturally large,
    and its tail is heavy, so a threshold on it lands far out and misses most anomalies. Dividing each residual
    by the device's own typical residual for that input makes every input count alike and puts the score on a
    scale where ≈ 1 is normal (the mean of squared standardised residuals): the score is
    ``mean_j (r_j / s_j)²``, which is the plain MSE when every ``s_j`` is 1.

    The typical residual is the root mean square of the model's out-of-sample residuals (the detector scores a
    batch before learning it), exponentially weighted, kept on the device like the input scaler. Every reading is
    learned, but with bounded influence: the detector passes, per reading, ``cap = min(1, cut / score)``, so a
    reading above its alert cut counts as one at the cut (a winsorised RMS). A plain RMS lets one early spike
    inflate the scale it is judged by (with ~100 readings learned, a 170-sigma spike multiplies a scale by 15 and
    hides the next one); learning only unflagged readings instead is a gate on the detector's own flags, which
    locks in: readings flagged because a scale is too small never correct it. Each scale is
    at least `floor`, in the units of the (standardised) input: an input the model reconstructs almost perfectly
    cannot turn rounding noise into alarms. A second, fast tracker (`recent_half_life`) follows the last few
    dozen readings, for `rebaseline` after a drift.

    Parameters
    ----------
    half_life
        Readings after which a residual's weight has halved (0: never forget).
    floor
        Smallest typical residual of an input (standardised inputs: a share of its standard deviation).
    recent_half_life
        Half-life of the fast tracker that `rebaseline` switches to.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scale = ResidualScale(half_life=0, floor=0.1)
    >>> residuals = rng.normal(size=(1000, 3)) * np.array([1.0, 10.0, 0.01])
    >>> scale.learn_many(residuals ** 2)
    >>> scale.scales.round(1).tolist()                  # the third input is floored
    [1.0, 9.7, 0.1]
    >>> scale.score_many(np.array([[1.0, 100.0, 0.0]])).round(2).tolist()  # a residual of 1 scale in 2 inputs
    [0.69]
    """

    def __init__(self, half_life: float = 0.0, floor: float = 0.1, recent_half_life: float = 72.0):
        if floor < 0:
            raise ValueError(f"model.scoring.floor must be >= 0, got {floor}")
        self.recent_half_life = float(recent_half_life)
        self.floor = float(floor)
        self.set_half_life(half_life)
        self._recent_forgetting = forgetting_factor(self.recent_half_life)
        self.weight = 0.0                        # total weight of the residuals learned (0: none yet)
        self.recent_weight = 0.0
        self.mean_square: np.ndarray | None = None
        self.recent_mean_square: np.ndarray | None = None
        self._inverse: np.ndarray | None = None  # 1 / scales², cached until the next update

    @property
    def scales(self) -> np.ndarray:
        """Each input's typical residual: sqrt of the mean square, at least `floor`; 1 before any residual."""
        if self.mean_square is None or self.weight == 0.0:
            return np.ones(0 if self.mean_square is None else self.mean_square.shape[0])
        return np.sqrt(np.maximum(self.mean_square, self.floor * self.floor))

    def _inverse_squares(self) -> np.ndarray | None:
        if self._inverse is None:
            scales = self.scales
            self._inverse = 1.0 / (scales * scales) if scales.shape[0] else None
        return self._inverse

    def normalise(self, squared_residuals: np.ndarray) -> np.ndarray:
        """Squared residuals (n, d') divided by the squared scales of the first d' inputs: each input in units of
        its typical residual (unchanged before any residual was learned)."""
        E = np.asarray(squared_residuals, dtype=np.float64)
        inverse = self._inverse_squares()
        return E.copy() if inverse is None else E * inverse[:E.shape[1]]

    def score_many(self, squared_residuals: np.ndarray) -> np.ndarray:
        """The anomaly score of each row: the mean of its normalised squared residuals."""
        N = self.normalise(squared_residuals)
        return np.add.reduce(N, axis=1) / N.shape[1]

    @staticmethod
    def _merge(mean: np.ndarray | None, weight: float, E: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
        """Exponentially weighted mean of the rows of `E` after `mean` (of total weight `weight`); the newest row
        weighs 1 and each older one λ times the next."""
        b = E.shape[0]
        w, w_total, _ = batch_weights(lam, b)
        old = weight * lam ** b
        total = old + w_total
        merged = w @ E if mean is None or old == 0.0 else old * mean + w @ E
        return merged / total, total

    def learn_many(self, squared_residuals: np.ndarray, cap: np.ndarray | None = None) -> None:
        """Learn squared residuals (n, d). With `cap` (n,), factors in (0, 1], the slow tracker learns each row
        multiplied by its factor (the detector's ``min(1, cut / score)``: a reading above the cut counts as one at
        the cut); the fast tracker, which a re-baselining after a drift takes, learns the rows as they are."""
        E = np.array(squared_residuals, dtype=np.float64, ndmin=2, copy=None)  # read, never kept
        if E.shape[0] == 0:
            return
        usual = E if cap is None else E * np.asarray(cap, dtype=np.float64)[:, None]
        self.mean_square, self.weight = self._merge(self.mean_square, self.weight, usual, self._forgetting)
        self.recent_mean_square, self.recent_weight = self._merge(self.recent_mean_square, self.recent_weight, E,
                                                                  self._recent_forgetting)
        self._inverse = None

    def learn_one(self, squared_residual: np.ndarray) -> None:
        self.learn_many(np.asarray(squared_residual, dtype=np.float64)[None, :])

    def restart(self) -> None:
        """Forget the slow tracker's history: the next batch sets the scales (after a model's early warm-up)."""
        self.weight = 0.0

    def rebaseline(self, max_weight: float) -> None:
        """Take the fast tracker's recent scales, worth at most `max_weight` readings of history (after a drift)."""
        if self.recent_mean_square is not None:
            self.mean_square = self.recent_mean_square.copy()
            self.weight = min(self.recent_weight, float(max_weight))
            self._inverse = None

    def set_half_life(self, half_life: float) -> None:
        """The slow tracker forgets at this half-life (readings; 0: never) from the next residual on."""
        self.half_life = float(half_life)
        self._forgetting = forgetting_factor(self.half_life)

    def rescale(self, a: np.ndarray) -> None:
        """Inputs that change units by the factors `a` (the detector's scaler moved): their residuals do too."""
        if self.mean_square is not None:
            squares = a * a
            self.mean_square = self.mean_square * squares
            self.recent_mean_square = self.recent_mean_square * squares
            self._inverse = None

    def to_array(self) -> np.ndarray:
        """``[half_life, recent_half_life, floor, weight, recent_weight, d, mean_square..., recent...]``."""
        d = 0 if self.mean_square is None else self.mean_square.shape[0]
        head = np.array([self.half_life, self.recent_half_life, self.floor, self.weight, self.recent_weight, d])
        return np.concatenate([head, self.mean_square, self.recent_mean_square]) if d else head

    @classmethod
    def from_array(cls, state: np.ndarray) -> "ResidualScale":
        state = np.asarray(state, dtype=np.float64)
        scale = cls(half_life=state[0], recent_half_life=state[1], floor=state[2])
        scale.weight, scale.recent_weight, d = float(state[3]), float(state[4]), int(state[5])
        if d:
            scale.mean_square = state[6:6 + d].copy()
            scale.recent_mean_square = state[6 + d:6 + 2 * d].copy()
        return scale


def metric_shares(normalised: np.ndarray, blocks: int, metrics: int | None = None) -> np.ndarray:
    """Each metric's share of each row's normalised squared residuals, (n, metrics): inputs derived from a metric
    (window lags, rolling statistics; laid out block-major, metrics fastest) count for that metric. With `metrics`,
    only the first `metrics` columns of each block are metrics; the rest (the time of day) are never blamed."""
    n = normalised.shape[0]
    per_metric = np.add.reduce(normalised.reshape(n, blocks, normalised.shape[1] // blocks), axis=1)
    if metrics is not None and metrics < per_metric.shape[1]:
        per_metric = per_metric[:, :metrics]
    total = np.add.reduce(per_metric, axis=1, keepdims=True)
    if (total > 0).all():
        return per_metric / total
    return np.divide(per_metric, total, out=np.zeros_like(per_metric), where=total > 0)


def largest_shares(shares: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `shares` (n, m), the positions and values of its `k` largest entries, largest first, ties to the
    lower position: what a stable sort of ``-shares`` puts first, by k passes of argmax instead of sorting every
    row (k is a handful: the metrics an alert names)."""
    n, m = shares.shape
    k = min(int(k), m)
    rows = np.arange(n)
    top = np.empty((n, k), dtype=np.intp)
    rest = shares.copy() if k > 1 else shares
    for j in range(k):
        top[:, j] = column = rest.argmax(axis=1)  # the first largest: ties go to the lower position
        if j + 1 < k:
            rest[rows, column] = -np.inf
    return top, shares[rows[:, None], top]
