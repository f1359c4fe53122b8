"""Online alert thresholds over a bounded history of recent anomaly scores (no labels).

All three share one contract: ``update_one(score)`` / ``update_many(scores)`` add scores, ``threshold`` is the
current cut (``inf`` until `MIN_SCORES` scores were seen), ``to_arrays()`` / ``threshold_from_arrays(arrays)``
serialise the whole state (settings as float64, the recent scores as float32: half the bytes of keyed state).
The cut is refitted every `refit_every` scores.

The recent scores are also the device's calibration set: ``p_values(scores)`` gives each new score's conformal
p-value against them and ``robust_z(scores)`` its robust z-score, so one fleet-wide cut means the same
false-alarm rate on every device.

Keeping only the last `history` scores lets the threshold follow a model that keeps learning (its scores fall),
at a price: a burst of anomalies longer than about ``q * history`` raises the cut for the next `history` scores.
The detector therefore leaves the readings of long incidents out of the history (`DeviceDetector`), and resets
it after a drift (`reset`).

>>> import numpy as np
>>> scores = np.random.default_rng(0).normal(size=5000)
>>> for kind in ("sigma", "quantile", "pot"):
...     t = make_threshold({"kind": kind, "target_false_alarm_rate": 0.01, "sigma_k": 2.33, "history": 2000})
...     t.update_many(scores)
...     print(kind, round(t.threshold, 1))
sigma 2.4
quantile 2.3
pot 2.4
>>> t.p_values(np.array([0.0, 2.33, 10.0])).round(4).tolist()   # 1/(n + 1) beyond every calibration score
[0.5037, 0.011, 0.0005]
>>> t.robust_z(np.array([0.0, 2.0])).round(2).tolist()
[-0.01, 1.93]
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

MIN_SCORES = 20  # below this many scores no cut is meaningful: `threshold` stays inf (no alerts)
MAD_TO_STD = 1.4826  # MAD × this estimates the standard deviation of a normal distribution


class _RecentScores:
    """Ring buffer of the last `capacity` finite scores, kept as float32 (scores need no more precision), and the
    same scores in ascending order (`ordered`, float64, for order statistics and p-values), kept in order as scores
    come and go: a few small operations per batch instead of sorting the whole history again."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self._next = 0
        self.count = 0
        self.ordered = np.zeros(0)

    def extend(self, scores: np.ndarray) -> None:
        scores = scores[np.isfinite(scores)][-self.capacity:]
        m = scores.shape[0]
        if m == 0:
            return
        idx = (self._next + np.arange(m)) % self.capacity
        n_evicted = max(0, self.count + m - self.capacity)  # the oldest, at the last positions written
        evicted = self._buf[idx[m - n_evicted:]] if n_evicted else None
        self._buf[idx] = scores
        self._next = (self._next + m) % self.capacity
        self.count = min(self.count + m, self.capacity)
        self.ordered = _reordered(self.ordered, evicted, self._buf[idx])

    def clear(self) -> None:
        self._next = self.count = 0
        self.ordered = np.zeros(0)

    def values(self) -> np.ndarray:
        """Scores oldest first, as float64."""
        if self.count < self.capacity:
            return self._buf[:self.count].astype(np.float64)
        return np.concatenate((self._buf[self._next:], self._buf[:self._next])).astype(np.float64)


def _reordered(ordered: np.ndarray, removed: np.ndarray | None, added: np.ndarray) -> np.ndarray:
    """The ascending array `ordered` without the values `removed` (each of which it holds, as often as it is
    given) and with the values `added`: equal to sorting the new multiset, in O(n) (a stable sort of two ascending
    runs is one merge)."""
    if removed is not None:
        removed = np.sort(removed).astype(np.float64)
        at = np.searchsorted(ordered, removed, side="left")
        at += np.arange(removed.shape[0]) - np.searchsorted(removed, removed, side="left")  # the j-th of equal ones
        keep = np.ones(ordered.shape[0], dtype=bool)
        keep[at] = False
        ordered = ordered[keep]
    merged = np.concatenate((ordered, np.sort(added).astype(np.float64)))
    merged.sort(kind="stable")
    return merged


def valley_order_statistic(values: np.ndarray, k: int) -> float:
    """The k-th smallest (from 0) of `values` that do not increase and then do not decrease (e.g. the distances of
    ascending scores to their median), equal to ``np.partition(values, k)[k]``, in O(n) without partitioning.

    Every k + 1 smallest values are a contiguous run (each sublevel set of a valley is one), and a run's largest
    value is at one of its ends: the answer is the smallest over all runs of k + 1 of their larger end.

    >>> v = np.abs(np.array([1.0, 2.0, 2.0, 3.0, 7.0, 8.0]) - 2.5)
    >>> [valley_order_statistic(v, k) for k in range(6)] == np.sort(v).tolist()
    True
    """
    n = values.shape[0]
    return float(np.maximum(values[:n - k], values[k:]).min())


class OnlineThreshold:
    """Base class: history, refit cadence, calibration and serialisation; subclasses implement
    `_fit(scores) -> float`."""

    KIND = 0.0  # code stored first in `to_arrays`, for `threshold_from_arrays`
    PARAMS: tuple[str, ...] = ()  # constructor parameters before `history`, stored in `to_arrays`

    def __init__(self, history: int = 2000, refit_every: int = 16):
        self.history = _RecentScores(history)
        self.refit_every = int(refit_every)
        self._since_fit = 0
        self._threshold = math.inf
        self._centre_spread: tuple[float, float] | None = None  # of the history, cached until the next update

    @property
    def threshold(self) -> float:
        return self._threshold

    def update_one(self, score: float) -> None:
        self.update_many(np.array([score], dtype=np.float64))

    def update_many(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64).ravel()
        self.history.extend(scores)
        self._centre_spread = None
        self._since_fit += scores.shape[0]
        if self._since_fit >= self.refit_every or self._threshold == math.inf:
            self.refit()

    def refit(self) -> None:
        """Recompute the cut from the current history now."""
        self._since_fit = 0
        if self.history.count >= MIN_SCORES:
            self._threshold = float(self._refit())

    def _refit(self) -> float:
        """The cut from the current history (`_fit` of the scores oldest first; a kind that needs only order
        statistics reads the history in order, `_calibration`)."""
        return self._fit(self.history.values())

    def _fit(self, scores: np.ndarray) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every score: the cut is ``inf`` again until `MIN_SCORES` new scores (after a re-baselining)."""
        self.history.clear()
        self._centre_spread = None
        self._since_fit = 0
        self._threshold = math.inf

    # -- calibration ------------------------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        """Whether there are enough recent scores (`MIN_SCORES`) to calibrate new ones."""
        return self.history.count >= MIN_SCORES

    def _calibration(self) -> np.ndarray:
        """The recent scores in ascending order (float64)."""
        return self.history.ordered

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-value of each score against the recent scores: ``(1 + #{recent ≥ s}) / (n + 1)``, in
        (0, 1]; on normal data P(p ≤ α) ≤ α, on every device alike (Vovk et al., 2005). NaN until calibrated."""
        scores = np.asarray(scores, dtype=np.float64)
        if not self.calibrated:
            return np.full(scores.shape, math.nan)
        recent = self._calibration()
        n = recent.shape[0]
        at_least = n - np.searchsorted(recent, scores, side="left")
        return (1.0 + at_least) / (n + 1.0)

    def robust_z(self, scores: np.ndarray) -> np.ndarray:
        """``(s − median) / (1.4826 · MAD)`` of the recent scores (the standard deviation if the MAD is 0).
        NaN until calibrated."""
        scores = np.asarray(scores, dtype=np.float64)
        if not self.calibrated:
            return np.full(scores.shape, math.nan)
        if self._centre_spread is None:
            recent = self._calibration()
            n = recent.shape[0]
            centre = 0.5 * (recent[(n - 1) // 2] + recent[n // 2])   # the median of the sorted scores
            deviations = np.abs(recent - centre)
            spread = MAD_TO_STD * 0.5 * (valley_order_statistic(deviations, (n - 1) // 2)
                                         + valley_order_statistic(deviations, n // 2))
            if spread <= 0.0:
                spread = max(float(recent.std()), 1e-12)
            self._centre_spread = (float(centre), float(spread))
        centre, spread = self._centre_spread
        return (scores - centre) / spread

    # -- persistence ------------------------------------------------------------------------------------------

    def to_arrays(self) -> list[np.ndarray]:
        """``[[kind, history capacity, refit_every, params..., since_fit, threshold], scores oldest first]``, the
        scores as float32."""
        params = [getattr(self, name) for name in self.PARAMS]
        head = [self.KIND, self.history.capacity, self.refit_every, *params, self._since_fit,
                self._threshold]
        return [np.array(head, dtype=np.float64), self.history.values().astype(np.float32)]

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> "OnlineThreshold":
        state, scores = np.asarray(arrays[0], dtype=np.float64), np.asarray(arrays[1], dtype=np.float32)
        n_params = len(cls.PARAMS)
        params = state[3:3 + n_params].tolist()
        obj = cls(*params, history=int(state[1]), refit_every=int(state[2]))
        obj.history.extend(scores)
        obj._since_fit = int(state[3 + n_params])
        obj._threshold = float(state[4 + n_params])
        return obj


class SigmaThreshold(OnlineThreshold):
    """Cut at mean + k·σ of the recent scores.

    Simple and stable, but only calibrated when scores are roughly Gaussian; reconstruction errors are skewed,
    so for a target false-alarm rate prefer `QuantileThreshold` or `PotThreshold`. With Gaussian scores
    k = 2.33 flags 1 %, k = 3 flags 0.13 %.
    """

    KIND = 1.0
    PARAMS = ("k",)

    def __init__(self, k: float = 3.0, history: int = 2000, refit_every: int = 16):
        super().__init__(history, refit_every)
        self.k = float(k)

    def _fit(self, scores: np.ndarray) -> float:
        return float(scores.mean() + self.k * scores.std())


class QuantileThreshold(OnlineThreshold):
    """Cut at the empirical (1 − q) quantile of the recent scores.

    Distribution-free, but it cannot place the cut beyond the largest recent score, so with ``q * history``
    below a handful of scores it is noisy; `PotThreshold` extrapolates the tail instead.
    """

    KIND = 2.0
    PARAMS = ("q",)

    def __init__(self, q: float = 0.01, history: int = 2000, refit_every: int = 16):
        super().__init__(history, refit_every)
        self.q = float(q)

    def _fit(self, scores: np.ndarray) -> float:
        # np.quantile's default (linear interpolation between the order statistics around (1 − q)(n − 1)), from
        # a partial sort: several times faster on a few thousand scores.
        below, above, fraction = self._positions(scores.shape[0])
        part = np.partition(scores, (below, above))
        return float(part[below] + fraction * (part[above] - part[below]))

    def _refit(self) -> float:
        # the same order statistics from the history kept in order (no sort, no partial sort)
        ordered = self._calibration()
        below, above, fraction = self._positions(ordered.shape[0])
        return float(ordered[below] + fraction * (ordered[above] - ordered[below]))

    def _positions(self, n: int) -> tuple[int, int, float]:
        position = (1.0 - self.q) * (n - 1)
        below = int(math.floor(position))
        return below, min(below + 1, n - 1), position - below


class PotThreshold(OnlineThreshold):
    """Peaks-Over-Threshold cut for a target false-alarm rate q (Siffer et al., KDD 2017, "SPOT").

    Extreme value theory: excesses over a high initial threshold t follow a Generalized Pareto distribution
    (Pickands–Balkema–de Haan), whatever the distribution of the scores. We take t as the `level` quantile of
    the recent scores, fit the GPD to the N_t excesses by the method of moments (not Grimshaw's maximum
    likelihood: closed form, no root finding; valid for shape γ < 1/2, i.e. tails lighter than a power law with
    finite variance), and return the SPOT cut

        z_q = t + σ/γ · ((q·n / N_t)^(−γ) − 1)        (γ → 0: z_q = t − σ·log(q·n / N_t))

    over the n recent scores. It differs from SPOT in refitting on a sliding history (like DSPOT's drift
    handling) instead of growing the peak set forever. Good at small q, where a plain quantile runs out of data.

    Parameters
    ----------
    q
        Target probability of a score above the cut on normal data.
    level
        Quantile of the initial threshold t (SPOT uses 0.98). With a short history it is lowered so that at
        least `MIN_PEAKS` excesses are fitted.
    """

    KIND = 3.0
    PARAMS = ("q", "level")
    MIN_PEAKS = 10  # fewer excesses give a useless moment estimate of the GPD

    def __init__(self, q: float = 0.01, level: float = 0.98, history: int = 2000, refit_every: int = 16):
        super().__init__(history, refit_every)
        self.q = float(q)
        self.level = float(level)
        self.gamma = 0.0
        self.sigma = 0.0

    def _fit(self, scores: np.ndarray) -> float:
        n = scores.shape[0]
        n_peaks = min(max(self.MIN_PEAKS, math.ceil((1.0 - self.level) * n)), n // 2)
        t = float(np.partition(scores, n - n_peaks - 1)[n - n_peaks - 1])
        excesses = scores[scores > t] - t
        n_excesses = excesses.shape[0]
        if n_excesses == 0:
            return t
        mean = float(np.add.reduce(excesses)) / n_excesses  # = excesses.mean() and .var(), without their overhead
        deviations = excesses - mean
        var = float(np.add.reduce(deviations * deviations)) / n_excesses
        if var <= 0.0:  # all excesses equal: fall back to the exponential tail (γ = 0, σ = mean)
            self.gamma, self.sigma = 0.0, mean
        else:
            ratio = mean * mean / var
            self.gamma, self.sigma = 0.5 * (1.0 - ratio), 0.5 * mean * (1.0 + ratio)
        r = self.q * n / n_excesses
        if r >= 1.0:  # fewer excesses than the target count (ties at t): the tail beyond t is already rarer than q
            return t
        if abs(self.gamma) < 1e-9:
            return t - self.sigma * math.log(r)
        return t + self.sigma / self.gamma * (r ** (-self.gamma) - 1.0)


KINDS: dict[str, type[OnlineThreshold]] = {"sigma": SigmaThreshold, "quantile": QuantileThreshold,
                                           "pot": PotThreshold}


def make_threshold(cfg: Any) -> OnlineThreshold:
    """The threshold named by ``cfg.kind`` (a `threshold:` config section or a plain dict with the same keys)."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    kind = get("kind", "pot")
    q = float(get("target_false_alarm_rate", 0.01))
    history = int(get("history", 2000))
    if kind == "sigma":
        return SigmaThreshold(float(get("sigma_k", 3.0)), history=history)
    if kind == "quantile":
        return QuantileThreshold(q, history=history)
    if kind == "pot":
        return PotThreshold(q, history=history)
    raise ValueError(f"threshold.kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")


def threshold_from_arrays(arrays: list[np.ndarray]) -> OnlineThreshold:
    """Rebuild any threshold from its `to_arrays()` state."""
    by_code = {cls.KIND: cls for cls in KINDS.values()}
    try:
        cls = by_code[float(arrays[0][0])]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a threshold state (kind code {arrays[0][:1] if len(arrays) else None!r})") from None
    return cls.from_arrays(arrays)
