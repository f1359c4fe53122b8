"""Incidents: a device's flagged readings that are close in time, as one thing an operator is told about."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

OPEN, RESOLVED = "open", "resolved"
STUCK = "stuck"  # the kind of the incidents of stuck metrics (`models.stuck`); the score's have no kind


def incident_id(device_id: str, start_seq: int, kind: str = "") -> str:
    """``<device_id>:<start_seq>``: an incident is named after its device and its first flagged reading; one of
    another kind than the score's gets it as a suffix (``<device_id>:<start_seq>:stuck``)."""
    return f"{device_id}:{int(start_seq)}:{kind}" if kind else f"{device_id}:{int(start_seq)}"


@dataclass(frozen=True)
class IncidentBatch:
    """What `IncidentTracker.update` returns for a batch of n readings."""

    starts: np.ndarray    # (n,) start_seq of each flagged reading's incident, -1 if not flagged
    ranks: np.ndarray     # (n,) rank of each flag in its incident (1: the first), 0 if not flagged
    during: np.ndarray    # (n,) bool: an incident was open at the reading (flagged, or within the gap after one)
    changes: list         # the `Incident` states that changed, in time order


@dataclass(frozen=True)
class Incident:
    """One state of an incident (what `IncidentTracker.update` reports when an incident opens, grows or is
    resolved). ``n_readings`` counts every reading from the first flagged one to the last, ``n_flagged`` those
    flagged; ``peak_ratio`` is the largest score / threshold; ``metrics_to_blame`` the metrics with the largest
    shares of the flagged readings' normalised residuals, summed over the incident; ``stuck_metrics`` the metrics
    that stopped moving in it, if any (`models.stuck`)."""

    status: str
    start_seq: int
    end_seq: int
    start_ts: int | None
    end_ts: int | None
    n_flagged: int
    n_readings: int
    peak_score: float
    peak_ratio: float
    metrics_to_blame: tuple[tuple[str, float], ...]
    model_version: int
    global_version: int
    stuck_metrics: tuple[tuple[str, int, int], ...] = ()  # (metric, longest run of repeats in the incident, its
    #                                                        usual longest) of each metric stuck in it (models.stuck)
    kind: str = ""        # "" (the score's flags) or STUCK

    def record_fields(self, device_id: str, updated_at: int) -> dict:
        """The fields of its `flead.incident/1` record (docs/contracts.md; `telemetry.schema.INCIDENT.make`); a
        later state of the same ``incident_id`` replaces an earlier one. Only a stuck-metric incident has
        ``stuck_metrics``."""
        stuck = ({"stuck_metrics": [{"metric": m, "repeats": repeats, "usual": usual}
                                    for m, repeats, usual in self.stuck_metrics]} if self.kind == STUCK else {})
        return {"incident_id": incident_id(device_id, self.start_seq, self.kind),
                "device_id": device_id, "status": self.status, "start_seq": self.start_seq,
                "end_seq": self.end_seq, "start_ts": self.start_ts, "end_ts": self.end_ts,
                "n_flagged": self.n_flagged, "n_readings": self.n_readings, "peak_score": self.peak_score,
                "peak_ratio": self.peak_ratio,
                "metrics_to_blame": [{"metric": m, "share": share} for m, share in self.metrics_to_blame],
                "model_version": self.model_version, "global_version": self.global_version, **stuck,
                "updated_at": int(updated_at)}


class IncidentTracker:
    """Group one device's flagged readings into incidents: a flag opens an incident, or extends the open one
    when at most `gap_readings` unflagged readings (and, with `gap_ms` > 0, at most `gap_ms` of event time)
    passed since its last flag; once more pass, the incident is resolved.

    Pure and compact (its state is one float64 array, `to_array`), so it lives in the device's keyed state.
    ``update`` returns an `IncidentBatch`: per reading, the start sequence number of its incident (-1 if not
    flagged), the rank of the flag within its incident (1 for the first, 0 if not flagged) and whether an
    incident was open at it (flagged, or within the gap after a flag); and the incident states that changed: an
    ``open`` state for every incident that opened or grew in the batch and a ``resolved`` one for every incident
    that ended (so one that opens and ends within a batch reports both).

    Parameters
    ----------
    metric_names
        Names of the metrics blamed in `Incident.metrics_to_blame`.
    gap_readings
        Unflagged readings after the last flag that keep an incident open.
    gap_ms
        Event time after the last flag that keeps an incident open (0: readings only). With both set, an
        incident ends when either is exceeded.
    top_k
        Metrics named per incident.
    kind
        What its flags are: "" for the score's, `STUCK` for stuck metrics (`models.stuck`; the incident's id says
        it, and its ``stuck_metrics`` name them).

    >>> import numpy as np
    >>> tracker = IncidentTracker(["cpu", "mem"], gap_readings=2)
    >>> flags = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    >>> shares = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])   # per flagged reading, per metric
    >>> batch = tracker.update(flags, scores=flags * 5.0, thresholds=np.full(11, 2.0), shares=shares,
    ...                        seqs=np.arange(100, 111))
    >>> batch.starts.tolist()
    [-1, 101, -1, 101, -1, -1, -1, 107, -1, -1, -1]
    >>> batch.ranks.tolist()
    [0, 1, 0, 2, 0, 0, 0, 1, 0, 0, 0]
    >>> batch.during.astype(int).tolist()
    [0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    >>> changes = batch.changes
    >>> [(c.status, c.start_seq, c.end_seq, c.n_flagged, c.n_readings) for c in changes]
    [('open', 101, 103, 2, 3), ('resolved', 101, 103, 2, 3), ('open', 107, 107, 1, 1), ('resolved', 107, 107, 1, 1)]
    >>> changes[1].metrics_to_blame, changes[1].peak_ratio
    ((('cpu', 0.8), ('mem', 0.2)), 2.5)
    """

    def __init__(self, metric_names: Sequence[str], gap_readings: int = 10, gap_ms: int = 0, top_k: int = 3,
                 kind: str = ""):
        if gap_readings < 0 or gap_ms < 0:
            raise ValueError(f"incidents: gap_readings ({gap_readings}) and gap_ms ({gap_ms}) must be >= 0")
        self.metric_names = list(metric_names)
        self.gap_readings, self.gap_ms, self.top_k, self.kind = int(gap_readings), int(gap_ms), int(top_k), kind
        self.n_incidents = 0      # incidents opened so far
        self.is_open = False
        self.start_seq = self.end_seq = 0
        self.start_ts: int | None = None
        self.end_ts: int | None = None
        self.n_flagged = self.n_readings = 0
        self.peak_score = self.peak_ratio = 0.0
        self.model_version = self.global_version = 0
        self.since_flag = 0       # unflagged readings after the open incident's last flag
        self.blame = np.zeros(len(self.metric_names))
        self.stuck_repeats = np.zeros(len(self.metric_names))  # per metric, its longest stuck run in the incident
        self.stuck_usual = np.zeros(len(self.metric_names))    # ... and its usual longest run then

    def _state(self, status: str) -> Incident:
        total = float(self.blame.sum())
        shares = self.blame / total if total > 0 else self.blame
        top = np.argsort(-shares, kind="stable")[:self.top_k]
        return Incident(status, self.start_seq, self.end_seq, self.start_ts, self.end_ts, self.n_flagged,
                        self.n_readings, self.peak_score, self.peak_ratio,
                        tuple((self.metric_names[j], float(shares[j])) for j in top if shares[j] > 0),
                        self.model_version, self.global_version,
                        tuple((self.metric_names[j], int(self.stuck_repeats[j]), int(self.stuck_usual[j]))
                              for j in np.flatnonzero(self.stuck_repeats)), self.kind)

    def _gap_passed(self, unflagged: int, ts: int | None) -> bool:
        if unflagged > self.gap_readings:
            return True
        return bool(self.gap_ms and ts is not None and self.end_ts is not None and ts - self.end_ts > self.gap_ms)

    def update(self, flags: np.ndarray, scores: np.ndarray, thresholds: np.ndarray, shares: np.ndarray,
               seqs: np.ndarray, ts: np.ndarray | None = None, model_version: int = 0, global_version: int = 0,
               stuck: tuple[np.ndarray, np.ndarray] | None = None) -> IncidentBatch:
        """Take a batch of readings in time order: their `flags`, `scores`, `thresholds` (n,), `shares` (one row of
        per-metric shares per flagged reading), sequence numbers `seqs`, event times `ts` (ms, optional) and, if
        metrics are stuck in the batch, `stuck`: per flagged reading each metric's stuck run (0: not stuck), and
        each metric's usual longest run."""
        flags = np.asarray(flags, dtype=bool)
        n = flags.shape[0]
        starts = np.full(n, -1, dtype=np.int64)
        ranks = np.zeros(n, dtype=np.int64)
        during = flags.copy()
        if not self.is_open and not flags.any():  # the usual case: nothing to do
            return IncidentBatch(starts, ranks, during, [])
        changes: list[Incident] = []
        grew = False
        cursor = 0
        self.model_version, self.global_version = int(model_version), int(global_version)
        for row, i in enumerate(np.flatnonzero(flags).tolist()):
            stamp = None if ts is None else int(ts[i])
            if self.is_open:
                unflagged = self.since_flag + (i - cursor)
                during[cursor:cursor + max(0, min(i - cursor, self.gap_readings - self.since_flag))] = True
                if self._gap_passed(unflagged, stamp):
                    changes.extend(self._resolve(grew))
                    grew = False
            score, threshold = float(scores[i]), float(thresholds[i])
            ratio = score / threshold if threshold > 0 else math.inf
            if self.is_open:
                self.n_readings += unflagged + 1
                self.n_flagged += 1
                self.peak_score, self.peak_ratio = max(self.peak_score, score), max(self.peak_ratio, ratio)
            else:
                self.is_open = True
                self.n_incidents += 1
                self.start_seq, self.start_ts = int(seqs[i]), stamp
                self.n_flagged = self.n_readings = 1
                self.peak_score, self.peak_ratio = score, ratio
                self.blame = np.zeros(len(self.metric_names))
                self.stuck_repeats = np.zeros(len(self.metric_names))
                self.stuck_usual = np.zeros(len(self.metric_names))
            self.end_seq, self.end_ts = int(seqs[i]), stamp
            self.blame += shares[row]
            if stuck is not None and stuck[0][row].any():
                longer = stuck[0][row] > self.stuck_repeats
                self.stuck_repeats[longer] = stuck[0][row][longer]
                self.stuck_usual[longer] = stuck[1][longer]
            self.since_flag = 0
            starts[i], ranks[i] = self.start_seq, self.n_flagged
            grew = True
            cursor = i + 1
        if self.is_open:
            during[cursor:cursor + max(0, min(n - cursor, self.gap_readings - self.since_flag))] = True
            self.since_flag += n - cursor
            if self._gap_passed(self.since_flag, None if ts is None or n == 0 else int(ts[-1])):
                changes.extend(self._resolve(grew))
            elif grew:
                changes.append(self._state(OPEN))
        return IncidentBatch(starts, ranks, during, changes)

    def _resolve(self, grew: bool) -> list[Incident]:
        """Close the open incident: its last ``open`` state if it grew in this batch, then the ``resolved`` one."""
        states = ([self._state(OPEN)] if grew else []) + [self._state(RESOLVED)]
        self.is_open = False
        self.since_flag = 0
        return states

    def expire(self, now_ts: int) -> list[Incident]:
        """Resolve the open incident if more than `gap_ms` of time passed since its last flag (for a device that
        went silent; with ``gap_ms = 0`` only later readings resolve incidents)."""
        if self.is_open and self.gap_ms and self.end_ts is not None and now_ts - self.end_ts > self.gap_ms:
            return self._resolve(False)
        return []

    def to_array(self) -> np.ndarray:
        """``[gap_readings, gap_ms, top_k, n_incidents, open, start_seq, end_seq, start_ts, end_ts, n_flagged,
        n_readings, peak_score, peak_ratio, model_version, global_version, since_flag, blame..., and for stuck metrics
        stuck_repeats..., stuck_usual...]`` (times NaN when unknown)."""
        def ts(v):
            return math.nan if v is None else v
        head = [self.gap_readings, self.gap_ms, self.top_k, self.n_incidents, int(self.is_open), self.start_seq,
                self.end_seq, ts(self.start_ts), ts(self.end_ts), self.n_flagged, self.n_readings, self.peak_score,
                self.peak_ratio, self.model_version, self.global_version, self.since_flag]
        stuck = [self.stuck_repeats, self.stuck_usual] if self.kind == STUCK else []  # the score's: none
        return np.concatenate([np.array(head, dtype=np.float64), self.blame, *stuck])

    @classmethod
    def from_array(cls, state: np.ndarray, metric_names: Sequence[str], kind: str = "") -> "IncidentTracker":
        s = np.asarray(state, dtype=np.float64)
        tracker = cls(metric_names, int(s[0]), int(s[1]), int(s[2]), kind)
        tracker.n_incidents, tracker.is_open = int(s[3]), bool(s[4])
        tracker.start_seq, tracker.end_seq = int(s[5]), int(s[6])
        tracker.start_ts, tracker.end_ts = (None if math.isnan(v) else int(v) for v in s[7:9])
        tracker.n_flagged, tracker.n_readings = int(s[9]), int(s[10])
        tracker.peak_score, tracker.peak_ratio = float(s[11]), float(s[12])
        tracker.model_version, tracker.global_version, tracker.since_flag = (int(v) for v in s[13:16])
        d = len(tracker.metric_names)
        tracker.blame = s[16:16 + d].copy()
        if s.shape[0] >= 16 + 3 * d:  # a stuck-metric tracker's
            tracker.stuck_repeats, tracker.stuck_usual = s[16 + d:16 + 2 * d].copy(), s[16 + 2 * d:16 + 3 * d].copy()
        return tracker
