"""Label-free drift monitor: a device flags far more readings than its target rate, for longer than an incident."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p), summed in log space (exact for the small n of a block)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return math.exp(top) * sum(math.exp(t - top) for t in log_terms)


@lru_cache(maxsize=64)
def least_significant_count(n: int, p: float, alpha: float) -> int:
    """The smallest number of flags among `n` readings whose binomial tail under rate `p` is below `alpha`.
    Cached: a monitor is built for every device restored from keyed state (a state-cache miss in the stream job),
    and the sum over the block's tail was three quarters of restoring a detector."""
    for k in range(n + 2):
        if binomial_tail(n, p, k) < alpha:
            return k
    return n + 1


@dataclass(frozen=True)
class DriftEvent:
    """A drift the monitor detected: at the reading `seq` (time `ts`), after which the device re-baselined."""

    seq: int
    ts: int | None
    reason: str
    flag_rate: float       # share of readings flagged over the monitor's window
    target_rate: float
    window: int            # readings the rate was measured over

    def record_fields(self, device_id: str, detected_at: int, model_version: int) -> dict:
        """The fields of its `flead.drift/1` record (docs/contracts.md; `telemetry.schema.DRIFT.make(**fields)`)."""
        return {"event_id": f"{device_id}:{self.seq}", "device_id": device_id,
                "seq": self.seq, "ts": self.ts, "reason": self.reason, "flag_rate": self.flag_rate,
                "target_rate": self.target_rate, "window": self.window, "detected_at": int(detected_at),
                "model_version": int(model_version)}


class DriftMonitor:
    """Decide, without labels, that a device's normal behaviour has changed: in each of the last `blocks` blocks
    of `block_readings` readings, it flagged more readings than its target false-alarm rate makes plausible (the
    binomial tail of the count is below `alpha` in every block).

    An anomaly also raises the flag rate, but ends; requiring every block of a window of
    ``blocks × block_readings`` readings to be significant separates a new normal from an incident shorter than
    about that window. After a drift the blocks start afresh, so the next decision needs a full window of new
    evidence.

    Parameters
    ----------
    target_rate
        The detector's target false-alarm rate (the flag rate on normal data).
    block_readings, blocks
        Size and number of the blocks of the window.
    alpha
        Significance of each block's test.

    >>> import numpy as np
    >>> monitor = DriftMonitor(target_rate=0.01, block_readings=50, blocks=3, alpha=1e-3)
    >>> monitor.min_flags                       # flags a block needs to count as significant
    5
    >>> monitor.update(np.zeros(400, dtype=bool)) is None
    True
    >>> flags = np.random.default_rng(0).random(400) < 0.3   # a new normal: 30 % flagged
    >>> at, rate = monitor.update(flags)   # the third significant block in a row ends at reading 149
    >>> at, round(rate, 2)
    (149, 0.27)
    """

    def __init__(self, target_rate: float, block_readings: int = 72, blocks: int = 4, alpha: float = 1e-3):
        if block_readings < 1 or blocks < 1 or not 0.0 < alpha < 1.0 or not 0.0 < target_rate < 1.0:
            raise ValueError(f"drift: block_readings ({block_readings}) and blocks ({blocks}) must be >= 1, alpha "
                             f"({alpha}) and the target false-alarm rate ({target_rate}) in (0, 1)")
        self.target_rate = float(target_rate)
        self.block_readings, self.blocks, self.alpha = int(block_readings), int(blocks), float(alpha)
        self.min_flags = least_significant_count(self.block_readings, self.target_rate, self.alpha)
        self.in_block = 0                               # readings in the current block
        self.flags_in_block = 0
        self.completed = np.zeros(self.blocks)          # flags of the last completed blocks, oldest first
        self.n_completed = 0                            # completed blocks since the start or the last drift
        self.n_events = 0

    @property
    def window(self) -> int:
        return self.blocks * self.block_readings

    @property
    def window_flag_rate(self) -> float:
        """Share of flagged readings over the completed blocks of the window."""
        n = min(self.n_completed, self.blocks)
        return float(self.completed[self.blocks - n:].sum()) / (n * self.block_readings) if n else 0.0

    def update(self, flags: np.ndarray) -> tuple[int, float] | None:
        """Count the flags (in time order). On a drift: the index in `flags` of the reading at which it was
        detected and the flag rate over the window (the monitor then starts afresh and counts the rest); else
        None."""
        flags = np.asarray(flags, dtype=bool)
        if self.in_block + flags.shape[0] < self.block_readings:  # no block completes: just count
            self.in_block += flags.shape[0]
            self.flags_in_block += int(np.count_nonzero(flags))
            return None
        position, detected = 0, None
        while position < flags.shape[0]:
            take = min(self.block_readings - self.in_block, flags.shape[0] - position)
            self.flags_in_block += int(np.count_nonzero(flags[position:position + take]))
            self.in_block += take
            position += take
            if self.in_block == self.block_readings:
                self.completed[:-1] = self.completed[1:]
                self.completed[-1] = self.flags_in_block
                self.n_completed += 1
                self.in_block = self.flags_in_block = 0
                if self.n_completed >= self.blocks and (self.completed >= self.min_flags).all() and detected is None:
                    detected = (position - 1, self.window_flag_rate)
                    self.n_events += 1
                    self.restart()
        return detected

    def retune(self, target_rate: float, alpha: float) -> None:
        """Take another target false-alarm rate and significance level, keeping the blocks counted so far."""
        tuned = DriftMonitor(target_rate, self.block_readings, self.blocks, alpha)   # checks them
        self.target_rate, self.alpha, self.min_flags = tuned.target_rate, tuned.alpha, tuned.min_flags

    def restart(self) -> None:
        """Start afresh (after a drift): forget the blocks."""
        self.completed[:] = 0
        self.n_completed = self.in_block = self.flags_in_block = 0

    def describe(self) -> str:
        return (f"more than {self.min_flags - 1} of {self.block_readings} readings flagged in each of the last "
                f"{self.blocks} blocks (binomial tail < {self.alpha:g} each at the target rate {self.target_rate:g})")

    def to_array(self) -> np.ndarray:
        head = [self.target_rate, self.block_readings, self.blocks, self.alpha, self.in_block, self.flags_in_block,
                self.n_completed, self.n_events]
        return np.concatenate([np.array(head, dtype=np.float64), self.completed])

    @classmethod
    def from_array(cls, state: np.ndarray) -> "DriftMonitor":
        state = np.asarray(state, dtype=np.float64)
        monitor = cls(float(state[0]), int(state[1]), int(state[2]), float(state[3]))
        monitor.in_block, monitor.flags_in_block, monitor.n_completed, monitor.n_events = (int(v) for v in state[4:8])
        monitor.completed = state[8:8 + monitor.blocks].copy()
        return monitor
