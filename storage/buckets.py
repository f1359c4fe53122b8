"""Bucketed documents for readings and scores: one MongoDB document per device per sink flush, values packed.

MongoDB's bucket pattern for time series: instead of one document per reading, one document holds a device's
readings of one flush as columns. The columns are packed little-endian arrays (BSON binary): on the embedded
server (FerretDB v1) arrays of numbers cost ~6x more to store than the same numbers packed, and metric values
dominate (docs/contracts.md, "Bucketed readings and scores", has the document shapes).

    >>> cols = score_columns([{"device_id": "a", "seq": 3, "ts": 1000, "score": 0.5, "threshold": None,
    ...                        "is_anomaly": False, "model_version": 1}])
    >>> doc = score_bucket("a", cols, generation=1, stored_at=2000)
    >>> doc["_id"], doc["n"], float(unpack_columns(doc, SCORE_COLUMNS)["score"][0])
    ('a:3', 1, 0.5)

`SeqIndex` remembers which sequence numbers of each device are stored, so replaying the same input with any
batching stores every reading exactly once. `check_score` / `valid_scores` refuse what cannot be stored
(non-finite or oversized numbers, timestamps whose roll-up bucket would overflow 64 bits) with a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from storage.schemas import SchemaViolation, check_document

# Column name -> NumPy dtype of the packed column (little-endian). Missing values: NaN for floats, -1 for labels.
SCORE_COLUMNS = {"seq": "<i8", "ts": "<i8", "score": "<f8", "threshold": "<f8", "p_value": "<f8",
                 "is_anomaly": "|u1", "label": "|i1", "model_version": "<i8", "global_version": "<i8",
                 "scored_at": "<i8", "incident": "<i4"}
READING_COLUMNS = {"seq": "<i8", "ts": "<i8", "label": "|i1", "values": "<f8"}
NO_LABEL = -1
NO_INCIDENT = -1
# Timestamps are stored as int64 epoch ms; roll-up buckets start at ts - ts % width, which must stay in int64 too.
MAX_ABS_TS = 2**62
# Scores and metric values are summed in roll-ups: keep sums of up to ~1e8 readings finite.
MAX_ABS_NUMBER = 1e300
MAX_INT64 = 2**63 - 1
# One bucket document stays far below MongoDB's 16 MB document limit.
MAX_BUCKET_BYTES = 4_000_000


def pack(values, dtype: str) -> bytes:
    """`values` as the packed little-endian bytes of a column."""
    return np.ascontiguousarray(values, dtype=np.dtype(dtype)).tobytes()


def unpack(raw: bytes, dtype: str) -> np.ndarray:
    """A packed column back as a NumPy array (read-only view of `raw`)."""
    return np.frombuffer(raw, dtype=np.dtype(dtype))


def unpack_columns(doc: dict, spec: dict[str, str]) -> dict[str, np.ndarray]:
    """Every packed column of a bucket document that `spec` names, as arrays (``values`` reshaped to n × metrics)."""
    packed = doc["columns"]
    out = {name: unpack(packed[name], dtype) for name, dtype in spec.items() if name in packed}
    if "values" in out:
        out["values"] = out["values"].reshape(doc["n"], len(doc["metric_names"]))
    return out


# --- which readings are stored ------------------------------------------------------------------------------

@dataclass
class SeqIndex:
    """The stored sequence numbers of each device, as sorted disjoint closed intervals.

    The sink consults it before writing, so a reading already stored (a replay after a restart, in any micro-batch
    grouping) is skipped, and a late reading that fills a gap is stored. Each device keeps at most `max_gaps` gaps:
    when more open, the oldest gap is closed, and a reading arriving into it later counts as stored.

    >>> index = SeqIndex()
    >>> index.add("a", np.array([0, 1, 2, 5, 6]))
    >>> index.unstored("a", np.array([1, 2, 3, 4, 5, 7])).tolist()
    [False, False, True, True, False, True]
    """

    max_gaps: int = 64
    intervals: dict[str, list[list[int]]] = field(default_factory=dict)

    def unstored(self, device_id: str, seqs: np.ndarray) -> np.ndarray:
        """A boolean mask: True where ``seqs[i]`` is not stored yet."""
        spans = self.intervals.get(device_id)
        seqs = np.asarray(seqs, dtype=np.int64)
        if not spans or (len(seqs) and seqs.min() > spans[-1][1]):
            return np.ones(len(seqs), dtype=bool)
        lows = np.array([s[0] for s in spans], dtype=np.int64)
        highs = np.array([s[1] for s in spans], dtype=np.int64)
        at = np.searchsorted(lows, seqs, side="right") - 1  # the interval starting at or before each seq
        inside = (at >= 0) & (seqs <= highs[np.maximum(at, 0)])
        return ~inside

    def add(self, device_id: str, seqs: np.ndarray) -> None:
        """Record `seqs` (any order) as stored."""
        seqs = np.unique(np.asarray(seqs, dtype=np.int64))
        if not len(seqs):
            return
        breaks = np.flatnonzero(np.diff(seqs) != 1)
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [len(seqs) - 1]))
        self.add_spans(device_id, [(int(seqs[s]), int(seqs[e])) for s, e in zip(starts, ends)])

    def add_spans(self, device_id: str, spans: Iterable[tuple[int, int]]) -> None:
        """Record closed intervals ``(low, high)`` as stored."""
        merged = sorted([list(s) for s in self.intervals.get(device_id, [])] + [list(s) for s in spans])
        out: list[list[int]] = []
        for low, high in merged:
            if out and low <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], high)
            else:
                out.append([low, high])
        while len(out) > self.max_gaps + 1:  # close the oldest gap
            out[0:2] = [[out[0][0], out[1][1]]]
        self.intervals[device_id] = out

    def high(self, device_id: str) -> int | None:
        """The highest stored seq of a device, or None."""
        spans = self.intervals.get(device_id)
        return spans[-1][1] if spans else None

    def clear(self) -> None:
        self.intervals.clear()


def bucket_spans(doc: dict) -> list[tuple[int, int]]:
    """The seq intervals a stored bucket document covers (its seq column is read only when it has gaps)."""
    if doc["seq_last"] - doc["seq_first"] + 1 == doc["n"]:
        return [(doc["seq_first"], doc["seq_last"])]
    seqs = unpack(doc["columns"]["seq"], SCORE_COLUMNS["seq"])
    index = SeqIndex(max_gaps=len(seqs))
    index.add("x", seqs)
    return [tuple(s) for s in index.intervals["x"]]


# --- score records ------------------------------------------------------------------------------------------

def _finite_number(value) -> bool:
    return type(value) in (float, int) and -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER  # NaN compares False


def check_score(record: dict) -> str | None:
    """Why a score record cannot be stored, or None. Checks its collection schema (alerts hold the complete
    record), then what the schema cannot say: numbers finite and summable, ``ts`` inside the storable range."""
    try:
        check_document("alerts", record, where="score record")
    except SchemaViolation as exc:
        return str(exc)
    for name in ("score", "threshold", "p_value"):
        value = record.get(name)
        if value is not None and not _finite_number(value):
            return f"{name}: {value!r} is not a finite number within ±{MAX_ABS_NUMBER:g}"
    p_value = record.get("p_value")
    if p_value is not None and not 0 < p_value <= 1:
        return f"p_value: {p_value!r} is outside (0, 1]"
    for name in ("seq", "model_version", "global_version", "scored_at"):
        value = record.get(name)
        if value is not None and not -MAX_INT64 <= value <= MAX_INT64:
            return f"{name}: {value} does not fit in 64 bits"
    if not -MAX_ABS_TS <= record["ts"] <= MAX_ABS_TS:
        return f"ts: {record['ts']} is outside the storable range (|ts| ≤ 2^62 ms)"
    incident = record.get("incident_id")
    if incident is not None and not (type(incident) is str and 0 < len(incident) <= 400):
        return f"incident_id: expected a string of 1 to 400 characters or null, got {str(incident)[:60]!r}"
    return None


_FAST_FIELDS = ("device_id", "seq", "ts", "score", "threshold", "is_anomaly", "model_version")


def valid_scores(records: Sequence[dict]) -> tuple[list[dict], list[tuple[int, str]]]:
    """Split score records into the storable ones and ``(index, reason)`` of the others.

    Well-formed batches (the stream job's) are checked column-wise; a batch with any doubt is checked record by
    record (`check_score`), so each bad record gets its own reason."""
    try:
        columns = {name: [r[name] for r in records] for name in _FAST_FIELDS}
        optional = {name: [r.get(name) for r in records] for name in ("p_value", "global_version", "scored_at",
                                                                       "label", "incident_id")}
    except (KeyError, TypeError):
        columns = None
    if columns is not None and _fast_batch_ok(records, columns, optional):
        return list(records), []
    good, bad = [], []
    for i, record in enumerate(records):
        reason = check_score(record) if type(record) is dict else f"expected an object, got {type(record).__name__}"
        if reason is None:
            good.append(record)
        else:
            bad.append((i, reason))
    return good, bad


def _fast_batch_ok(records: Sequence[dict], columns: dict, optional: dict) -> bool:
    if not {type(d) for d in columns["device_id"]} <= {str}:
        return False
    if any(not 0 < len(d) <= 200 for d in set(columns["device_id"])):
        return False
    ints = ("seq", "ts", "model_version")
    if any(not {type(v) for v in columns[name]} <= {int} for name in ints):
        return False
    if not {type(v) for v in columns["is_anomaly"]} <= {bool}:
        return False
    if not {type(v) for v in columns["score"]} <= {float, int}:
        return False
    if not {type(v) for v in columns["threshold"] + optional["p_value"]} <= {float, int, type(None)}:
        return False
    if not {type(v) for v in optional["global_version"] + optional["scored_at"]} <= {int, type(None)}:
        return False
    if not set(optional["label"]) <= {0, 1, None} or not {type(v) for v in optional["label"]} <= {int, type(None)}:
        return False
    try:
        seq, ts = np.array(columns["seq"], dtype=np.int64), np.array(columns["ts"], dtype=np.int64)
        versions = np.array(columns["model_version"] + [v or 0 for v in optional["global_version"]], dtype=np.int64)
    except OverflowError:
        return False
    numbers = np.array(columns["score"] + [v for v in columns["threshold"] if v is not None], dtype=np.float64)
    p_values = np.array([v for v in optional["p_value"] if v is not None], dtype=np.float64)
    if (seq.min() < 0 or versions.min() < 0 or np.abs(ts).max() > MAX_ABS_TS
            or not (np.abs(numbers) <= MAX_ABS_NUMBER).all() or not ((p_values > 0) & (p_values <= 1)).all()):
        return False
    # anomalous records become alerts, which carry top_metrics and incident_id: check them as documents
    return all(check_score(r) is None for r, flagged in zip(records, columns["is_anomaly"]) if flagged)


def score_columns(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Valid score records (of one device) as columns in `SCORE_COLUMNS` order, plus ``incident_ids``: the
    distinct incident ids the ``incident`` column indexes (-1: none)."""
    incident_ids: dict[str, int] = {}
    incident = [NO_INCIDENT if r.get("incident_id") is None else incident_ids.setdefault(r["incident_id"],
                                                                                          len(incident_ids))
                for r in records]
    nan = math.nan
    cols = {
        "seq": np.array([r["seq"] for r in records], dtype=np.int64),
        "ts": np.array([r["ts"] for r in records], dtype=np.int64),
        "score": np.array([r["score"] for r in records], dtype=np.float64),
        "threshold": np.array([nan if r["threshold"] is None else r["threshold"] for r in records], dtype=np.float64),
        "p_value": np.array([nan if r.get("p_value") is None else r["p_value"] for r in records], dtype=np.float64),
        "is_anomaly": np.array([r["is_anomaly"] for r in records], dtype=np.uint8),
        "label": np.array([NO_LABEL if r.get("label") is None else r["label"] for r in records], dtype=np.int8),
        "model_version": np.array([r["model_version"] for r in records], dtype=np.int64),
        "global_version": np.array([r.get("global_version") or 0 for r in records], dtype=np.int64),
        "scored_at": np.array([r.get("scored_at") or 0 for r in records], dtype=np.int64),
        "incident": np.array(incident, dtype=np.int32),
    }
    cols["incident_ids"] = np.array(list(incident_ids), dtype=object)
    return cols


def select_rows(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The columns at `rows` (index array or mask), keeping table-level entries (``incident_ids``, ``names``)."""
    return {k: (v if k in ("incident_ids", "names") else v[rows]) for k, v in cols.items()}


def first_of_each_seq(seqs: np.ndarray) -> np.ndarray:
    """Row indices that keep the first row of each seq, in seq order (a batch may carry a reading twice)."""
    _, first = np.unique(seqs, return_index=True)
    return first


def _bucket_head(device_id: str, seq: np.ndarray, ts: np.ndarray, generation: int, stored_at: int) -> dict:
    return {"_id": f"{device_id}:{int(seq[0])}", "device_id": device_id, "seq_first": int(seq[0]),
            "seq_last": int(seq[-1]), "ts_min": int(ts.min()), "ts_max": int(ts.max()), "n": int(len(seq)),
            "generation": generation, "stored_at": stored_at}


def score_bucket(device_id: str, cols: dict[str, np.ndarray], generation: int, stored_at: int) -> dict:
    """The `predictions` document of one device's new score records (columns sorted by seq, seqs distinct)."""
    doc = _bucket_head(device_id, cols["seq"], cols["ts"], generation, stored_at)
    doc["anomalies"] = int(cols["is_anomaly"].sum())
    doc["columns"] = {name: pack(cols[name], dtype) for name, dtype in SCORE_COLUMNS.items()}
    doc["incident_ids"] = [str(i) for i in cols["incident_ids"]]
    return doc


def score_records(doc: dict) -> list[dict]:
    """The score records of a `predictions` bucket (without ``top_metrics``: alerts keep those)."""
    cols = unpack_columns(doc, SCORE_COLUMNS)
    ids = doc.get("incident_ids", [])
    out = []
    for i in range(doc["n"]):
        threshold, p_value, label = cols["threshold"][i], cols["p_value"][i], int(cols["label"][i])
        incident = int(cols["incident"][i])
        out.append({"device_id": doc["device_id"], "seq": int(cols["seq"][i]), "ts": int(cols["ts"][i]),
                    "score": float(cols["score"][i]), "threshold": None if math.isnan(threshold) else float(threshold),
                    "p_value": None if math.isnan(p_value) else float(p_value),
                    "is_anomaly": bool(cols["is_anomaly"][i]), "label": None if label == NO_LABEL else label,
                    "model_version": int(cols["model_version"][i]), "global_version": int(cols["global_version"][i]),
                    "scored_at": int(cols["scored_at"][i]), "incident_id": None if incident < 0 else ids[incident]})
    return out


def reading_bucket(device_id: str, seq: np.ndarray, ts: np.ndarray, labels: np.ndarray, names: Sequence[str],
                   values: np.ndarray, generation: int, stored_at: int) -> dict:
    """The `device_data` document of one device's new readings: ``values`` is n × len(names), NaN = missing."""
    doc = _bucket_head(device_id, seq, ts, generation, stored_at)
    doc["metric_names"] = list(names)
    doc["columns"] = {"seq": pack(seq, "<i8"), "ts": pack(ts, "<i8"), "label": pack(labels, "|i1"),
                      "values": pack(values, "<f8")}
    return doc


def max_bucket_rows(n_values_per_row: int) -> int:
    """How many rows of this width one bucket document holds."""
    return max(1, MAX_BUCKET_BYTES // (8 * n_values_per_row + 40))


def chunks(n: int, size: int) -> list[slice]:
    """`n` rows as consecutive slices of at most `size`."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
