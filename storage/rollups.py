"""Roll-ups: the small collections the dashboards read, summed from bucketed readings and scores.

Four levels (widths from ``cfg.rollups``, buckets by event time, ``ts`` = a bucket's start):

    collection       group     width                 from          fields
    score_rollups    device    device_bucket_s       predictions   n, anomalies, score_sum, score_max,
    daily_rollups    device    daily_bucket_s        predictions     threshold_max, anomaly_score_max
    fleet_rollups    fleet     fleet_bucket_s        predictions
    metric_rollups   device    metric_bucket_s       device_data   n, metrics: [{name, n, sum, device_id, ts}]

The metric level is coarser than the score level: each of its documents holds every metric of a device, and the
embedded server reads a whole collection for any query but an ``_id`` lookup, so the drill-down's metric chart
costs in proportion to this collection's size (see docs/benchmarks.md, dashboards).

The embedded MongoDB server updates documents slowly (it scans the collection for each one), so roll-ups are
written insert-only: the sink sums what it stored during one *generation* (``rollups.generation_s``) and inserts
one partial document per group and bucket, ``_id`` = ``<group>:<bucket start>:<generation>``. Readers add
partials up (``SUM(n)``, ``MAX(score_max)``), which is what the dashboards do anyway. A generation also closes
when the input pauses, so the dashboards show everything stored once the stream is quiet. The sink merges the
partials of each bucket every `rollups.compact_interval_s` (`BucketWriter.compact_rollups`), so a live stream
leaves about one document per bucket. Every stored bucket
document carries its generation, so the partials of a generation are a pure function of stored documents: a sink
that died mid-generation recomputes them at start, and re-inserting a partial that exists is a no-op.

    >>> acc = RollupAccumulator([Level("score_rollups", "scores", True, 600_000)])
    >>> acc.add_scores("a", {"ts": np.array([0, 1, 600_000]), "score": np.array([1.0, 3.0, 2.0]),
    ...                      "threshold": np.array([2.0, 2.0, np.nan]), "is_anomaly": np.array([0, 1, 0])})
    >>> [(d["_id"], d["n"], d["anomalies"], d["score_max"]) for d in acc.documents(7, stored_at=0)["score_rollups"]]
    [('a:0:7', 2, 1, 3.0), ('a:600000:7', 1, 0, 2.0)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from config import Config
from storage.buckets import MAX_ABS_TS

FLEET = "fleet"
SCORE_FIELDS = ("n", "anomalies", "score_sum", "score_max", "threshold_max", "anomaly_score_max")


@dataclass(frozen=True)
class Level:
    """One roll-up collection: its key in ``mongo.collections``, source ("scores" | "readings"), whether it is
    per device (else the whole fleet), and its bucket width in ms."""

    key: str
    source: str
    per_device: bool
    bucket_ms: int


def levels(cfg: Config) -> list[Level]:
    """The configured roll-up levels."""
    r = cfg.rollups
    return [Level("score_rollups", "scores", True, r.device_bucket_s * 1000),
            Level("daily_rollups", "scores", True, r.daily_bucket_s * 1000),
            Level("fleet_rollups", "scores", False, r.fleet_bucket_s * 1000),
            Level("metric_rollups", "readings", True, r.metric_bucket_s * 1000)]


def bucket_starts(ts: np.ndarray, bucket_ms: int) -> np.ndarray:
    """Each timestamp's bucket start (floor, also for times before 1970)."""
    ts = np.asarray(ts, dtype=np.int64)
    return ts - np.mod(ts, bucket_ms)


def _grouped(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys, order that sorts by key, start of each key's run in that order)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    return sorted_keys[starts], order, starts


def _max_or_none(a, b):
    if a is None:
        return b
    return a if b is None else max(a, b)


def _min_or_none(a, b):
    if a is None:
        return b
    return a if b is None else min(a, b)


def merge_score_stats(into: dict, stats: dict) -> None:
    """Add one set of score statistics to another (counts and sums added, maxima kept)."""
    for name in ("n", "anomalies", "score_sum"):
        into[name] = into.get(name, 0) + stats[name]
    for name in ("score_max", "threshold_max", "anomaly_score_max"):
        into[name] = _max_or_none(into.get(name), stats.get(name))


def merge_metric_stats(into: dict, stats: dict) -> None:
    """Add one set of metric statistics to another, metric by metric (values present, sum)."""
    into["n"] = into.get("n", 0) + stats["n"]
    metrics = into.setdefault("metrics", {})
    for name, (n, total) in stats["metrics"].items():
        m = metrics.get(name, (0, 0.0))
        metrics[name] = (m[0] + n, m[1] + total)


def score_stats(ts: np.ndarray, cols: dict, bucket_ms: int) -> dict[int, dict]:
    """Score statistics per bucket start of one device's records (columns ``score, threshold, is_anomaly``)."""
    buckets, order, starts = _grouped(bucket_starts(ts, bucket_ms))
    score = np.asarray(cols["score"], dtype=np.float64)[order]
    threshold = np.asarray(cols["threshold"], dtype=np.float64)[order]
    flagged = np.asarray(cols["is_anomaly"], dtype=bool)[order]
    ends = np.r_[starts[1:], len(order)]
    out = {}
    for bucket, start, end in zip(buckets.tolist(), starts, ends):
        s, t, f = score[start:end], threshold[start:end], flagged[start:end]
        t = t[~np.isnan(t)]
        out[bucket] = {"n": int(end - start), "anomalies": int(f.sum()), "score_sum": float(s.sum()),
                       "score_max": float(s.max()), "threshold_max": float(t.max()) if len(t) else None,
                       "anomaly_score_max": float(s[f].max()) if f.any() else None}
    return out


def metric_stats(ts: np.ndarray, names: Sequence[str], values: np.ndarray, bucket_ms: int) -> dict[int, dict]:
    """Per bucket start: readings ``n`` and, per metric, (values present, their sum) (NaN = missing). The
    dashboards show means; the embedded server's scan cost grows with document size, so nothing more is kept."""
    buckets, order, starts = _grouped(bucket_starts(ts, bucket_ms))
    values = np.asarray(values, dtype=np.float64)[order]
    ends = np.r_[starts[1:], len(order)]
    out = {}
    for bucket, start, end in zip(buckets.tolist(), starts, ends):
        block = values[start:end]
        present = ~np.isnan(block)
        counts = present.sum(axis=0)
        sums = np.where(present, block, 0.0).sum(axis=0)
        out[bucket] = {"n": int(end - start),
                       "metrics": {name: (int(c), float(t)) for name, c, t in zip(names, counts, sums) if c}}
    return out


class RollupAccumulator:
    """Sums what one generation stored, per level, group and bucket; `documents` gives the partials."""

    def __init__(self, roll_levels: Iterable[Level]):
        self.levels = list(roll_levels)
        self.stats: dict[str, dict[tuple[str, int], dict]] = {level.key: {} for level in self.levels}
        self.skipped = 0  # readings left out: a timestamp whose bucket start would not fit in 64 bits

    def _storable(self, ts: np.ndarray) -> np.ndarray | None:
        """Rows whose bucket start fits in int64 (None: all of them)."""
        ts = np.asarray(ts, dtype=np.int64)
        ok = (ts >= -MAX_ABS_TS) & (ts <= MAX_ABS_TS)
        if ok.all():
            return None
        self.skipped += int((~ok).sum())
        return ok

    def add_scores(self, device_id: str, cols: dict) -> None:
        """Add one device's stored score records (columns ``ts, score, threshold, is_anomaly``)."""
        ok = self._storable(cols["ts"])
        if ok is not None:
            cols = {name: np.asarray(cols[name])[ok] for name in ("ts", "score", "threshold", "is_anomaly")}
        for level in self.levels:
            if level.source != "scores" or not len(cols["ts"]):
                continue
            group = device_id if level.per_device else FLEET
            target = self.stats[level.key]
            for bucket, stats in score_stats(cols["ts"], cols, level.bucket_ms).items():
                merge_score_stats(target.setdefault((group, bucket), {}), stats)

    def add_readings(self, device_id: str, ts: np.ndarray, names: Sequence[str], values: np.ndarray) -> None:
        """Add one device's stored readings."""
        ok = self._storable(ts)
        if ok is not None:
            ts, values = np.asarray(ts)[ok], np.asarray(values)[ok]
        for level in self.levels:
            if level.source != "readings" or not len(ts):
                continue
            target = self.stats[level.key]
            group = device_id if level.per_device else FLEET
            for bucket, stats in metric_stats(ts, names, values, level.bucket_ms).items():
                merge_metric_stats(target.setdefault((group, bucket), {}), stats)

    def __bool__(self) -> bool:
        return any(self.stats.values())

    def documents(self, generation: int, stored_at: int) -> dict[str, list[dict]]:
        """The partial documents of `generation`, per collection key."""
        out = {}
        for level in self.levels:
            docs = []
            for (group, bucket), stats in sorted(self.stats[level.key].items()):
                doc = {"_id": f"{group}:{bucket}:{generation}", "ts": bucket, "generation": generation,
                       "stored_at": stored_at}
                if level.per_device:
                    doc["device_id"] = group
                if level.source == "scores":
                    doc.update({k: v for k, v in stats.items() if v is not None})
                else:
                    doc["n"] = stats["n"]
                    # each item repeats its group and bucket: the embedded server's $unwind keeps only the
                    # unwound field, and the drill-down unwinds these items into rows
                    context = {"ts": bucket, **({"device_id": group} if level.per_device else {})}
                    doc["metrics"] = [{"name": name, "n": n, "sum": total, **context}
                                      for name, (n, total) in sorted(stats["metrics"].items())]
                docs.append(doc)
            out[level.key] = docs
        return out


def merged(partials: Iterable[dict], source: str) -> dict:
    """The statistics of several partial documents of one group and bucket, added up (for checks and repairs)."""
    into: dict = {}
    for p in partials:
        if source == "scores":
            merge_score_stats(into, {k: p.get(k) for k in SCORE_FIELDS})
        else:
            merge_metric_stats(into, {"n": p["n"], "metrics": {m["name"]: (m["n"], m["sum"]) for m in p["metrics"]}})
    if source == "readings":
        into["metrics"] = {k: v for k, v in sorted(into.get("metrics", {}).items())}
    return into


def merged_document(level: Level, partials: Sequence[dict]) -> dict:
    """One document holding several partials of one group and bucket: ``_id`` ``<group>:<bucket>:<newest
    generation>c``, `stored_at` the newest of theirs (retention counts from when the data came)."""
    first = partials[0]
    group = first.get("device_id", FLEET)
    generation = max(p["generation"] for p in partials)
    acc = RollupAccumulator([level])
    acc.stats[level.key][(group, first["ts"])] = merged(partials, level.source)
    [doc] = acc.documents(generation, max(p["stored_at"] for p in partials))[level.key]
    doc["_id"] += "c"  # not the id of the partial of that generation
    return doc
