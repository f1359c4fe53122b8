"""Stuck metrics: a metric that stops moving (a dead exporter, a hung process) while its value stays ordinary.

A reconstruction model cannot see this (an ordinary value reconstructs well), so it is watched apart from the score:
per metric, the current run of exactly repeated values against the longest run the device showed for that metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StuckBatch:
    """What `StuckMonitor.update` returns for a batch of n readings of d metrics."""

    repeats: np.ndarray   # (n, d) int: readings in a row each metric has equalled the one before, at each reading
    stuck: np.ndarray     # (n, d) bool: that run is longer than the metric's bound (and the monitor is active)
    usual: np.ndarray     # (d,) the longest unflagged run of each metric before the batch ("its usual longest")


class StuckMonitor:
    """Flag a metric whose run of exactly repeated values is far longer than any it showed before.

    A reading's run for a metric is the number of readings in a row, up to it, equal to the one before (a missing
    value ends a run). It is flagged stuck when that run exceeds ``max(min_repeats, longer_than × L)``, with L the
    longest run the device had for the metric in runs that were not flagged. Both rules come from the device's own
    history, not from labels: a metric that often holds still (an idle counter at 0) has a long L and is left alone;
    one that always moves is flagged once it holds still for more than `min_repeats` readings. For run lengths
    with a geometric tail, beating twice the record of a history of N runs has a chance of about 1/N (beating
    the record itself: about 1/2, so "longer than ever" alone would flag most metrics once in a while).

    Flagged runs do not extend L: a failure that recurs is told each time. Runs that began in the first `warmup`
    readings are learned, never flagged (a metric that has never moved is constant, not stuck). Pure and compact
    (its state is one float64 array, `to_array`), so it lives in keyed state.

    >>> import numpy as np
    >>> monitor = StuckMonitor(2, longer_than=2.0, min_repeats=5, warmup=0)
    >>> history = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [2.0, 0.2], [3.0, 0.3]])  # cpu held for 2 repeats
    >>> bool(monitor.update(history).stuck.any())
    False
    >>> batch = monitor.update(np.column_stack([np.full(8, 3.0), np.linspace(0.4, 1.1, 8)]))  # cpu holds at 3.0
    >>> batch.repeats[:, 0].tolist(), batch.stuck[:, 0].astype(int).tolist(), batch.usual.tolist()
    ([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 1, 1, 1], [2.0, 1.0])
    >>> bool(monitor.update(np.array([[4.0, 1.2]])).stuck.any()), monitor.longest.tolist()  # a flagged run: L stays
    (False, [2.0, 1.0])
    """

    HEAD = 4  # to_array: longer_than, min_repeats, warmup, n_seen

    def __init__(self, n_metrics: int, longer_than: float = 2.0, min_repeats: int = 5, warmup: int = 0):
        if longer_than < 1 or min_repeats < 1 or warmup < 0:
            raise ValueError(f"stuck: longer_than ({longer_than}) and min_repeats ({min_repeats}) must be >= 1, "
                             f"warmup ({warmup}) >= 0")
        self.longer_than, self.min_repeats, self.warmup = float(longer_than), int(min_repeats), int(warmup)
        self.n_seen = 0
        self.last = np.full(n_metrics, np.nan)    # each metric's last value (NaN: none)
        self.run = np.zeros(n_metrics)            # its current run of repeats
        self.longest = np.zeros(n_metrics)        # L: its longest unflagged run so far

    @property
    def bounds(self) -> np.ndarray:
        """(d,) the run each metric must exceed to be flagged: ``max(min_repeats, longer_than × L)``."""
        return np.maximum(self.min_repeats, self.longer_than * self.longest)

    def update(self, X: np.ndarray) -> StuckBatch:
        """Take a batch of raw readings (n, d) in time order; the runs and flags at each, from state before it."""
        X = np.asarray(X, dtype=np.float64)
        n = X.shape[0]
        moved = np.empty(X.shape, dtype=bool)                       # NaN never equals: a missing value ends a run
        np.not_equal(X[:1], self.last, out=moved[:1])
        np.not_equal(X[1:], X[:-1], out=moved[1:])
        rows = np.arange(n)[:, None]
        last_move = np.maximum.accumulate(np.where(moved, rows, -1), axis=0)
        repeats = np.where(last_move >= 0, rows - last_move, self.run + rows + 1)
        bounds, usual = self.bounds, self.longest.copy()
        judged = self.n_seen + rows - repeats >= self.warmup        # the run began after the warm-up
        stuck = (repeats > bounds) & judged
        # Runs that ended in the batch (a move at row i ends the run held at row i - 1) extend L unless flagged.
        previous = np.concatenate((self.run[None, :], repeats[:-1]))
        carried = (self.run > bounds) & (self.n_seen - 1 - self.run >= self.warmup)  # the run held before was flagged
        flagged_before = np.concatenate((carried[None, :], stuck[:-1]))
        longest = np.maximum(self.longest, np.where(moved & ~flagged_before, previous, 0).max(axis=0))
        for j in np.flatnonzero((longest > self.longest) & stuck.any(axis=0)):
            # L rose within the batch and a later run was judged by the old bound: replay this metric in order,
            # so that a batch gives what the same readings one by one give (rare: a run ending, then a longer one)
            stuck[:, j], longest[j] = self._replay(j, moved[:, j], repeats[:, j], judged[:, j])
        self.longest = longest
        self.run = repeats[-1].astype(np.float64)
        self.last = X[-1].copy()
        self.n_seen += n
        return StuckBatch(repeats.astype(np.int64), stuck, usual)

    def _replay(self, j: int, moved: np.ndarray, repeats: np.ndarray, judged: np.ndarray) -> tuple:
        """Metric `j`'s flags and new L over a batch, reading by reading (its bound follows L as runs end)."""
        longest = float(self.longest[j])
        flagged = bool(self.run[j] > max(self.min_repeats, self.longer_than * longest)
                       and self.n_seen - 1 - self.run[j] >= self.warmup)
        held = float(self.run[j])
        stuck = np.zeros(repeats.shape[0], dtype=bool)
        for i, (move, run, on) in enumerate(zip(moved.tolist(), repeats.tolist(), judged.tolist())):
            if move and not flagged:
                longest = max(longest, held)
            flagged = stuck[i] = bool(on and run > max(self.min_repeats, self.longer_than * longest))
            held = run
        return stuck, longest

    def to_array(self) -> np.ndarray:
        """``[longer_than, min_repeats, warmup, n_seen, last..., run..., longest...]``."""
        head = [self.longer_than, self.min_repeats, self.warmup, self.n_seen]
        return np.concatenate([np.array(head, dtype=np.float64), self.last, self.run, self.longest])

    @classmethod
    def from_array(cls, state: np.ndarray) -> "StuckMonitor":
        s = np.asarray(state, dtype=np.float64)
        d = (s.shape[0] - cls.HEAD) // 3
        monitor = cls(d, float(s[0]), int(s[1]), int(s[2]))
        monitor.n_seen = int(s[3])
        monitor.last, monitor.run, monitor.longest = (s[cls.HEAD + i * d:cls.HEAD + (i + 1) * d].copy()
                                                      for i in range(3))
        return monitor
