"""Bucketed documents for readings and scores: one MongoDB document per device per sink flush, values packed.

MongoDB's bucket pattern for time series: instead of one document per reading, one document holds a device's
readings of one flush as columns. The columns are packed little-endian arrays (BSON binary): on the embedded
server (FerretDB v1) arrays of numbers cost ~6x more to store than the same numbers packed, and metric values
dominate (docs/contracts.md, "Bucketed readings and scores", has the document shapes).

    >>> block = records_block("a", [{"device_id": "a", "seq": 3, "ts": 1000, "score": 0.5, "threshold": None,
    ...                              "is_anomaly": False, "model_version": 1}])
    >>> doc = score_bucket("a", block.cols, generation=1, stored_at=2000)
    >>> doc["_id"], doc["n"], float(unpack_columns(doc, SCORE_COLUMNS)["score"][0])
    ('a:3', 1, 0.5)

`SeqIndex` remembers which sequence numbers of each device are stored, so replaying the same input with any
batching stores every reading exactly once. `score_block` / `check_score` refuse what cannot be stored
(non-finite or oversized numbers, timestamps whose roll-up bucket would overflow 64 bits) with a reason.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Iterable, Sequence

import numpy as np
from bson.binary import Binary

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
ZLIB_SUBTYPE = 0x80  # BSON binary subtype 128 (user-defined): a zlib-compressed packed column
MIN_COMPRESSED_BYTES = 256
MAX_INCIDENT_ID_CHARS = 500  # "<device_id>:<start_seq>" (telemetry.schema.MAX_ID_CHARS)


def pack(values, dtype: str) -> bytes:
    """`values` as a packed column: little-endian bytes, zlib-compressed (BSON binary subtype `ZLIB_SUBTYPE`)
    when that is smaller. Telemetry compresses well (repeated values, few digits; ASD: to 13 %), and the embedded
    server's cost grows with the bytes it stores."""
    raw = np.ascontiguousarray(values, dtype=np.dtype(dtype)).tobytes()
    if len(raw) >= MIN_COMPRESSED_BYTES:
        compressed = zlib.compress(raw, 1)
        if len(compressed) < len(raw):
            return Binary(compressed, ZLIB_SUBTYPE)
    return raw


def unpack(raw: bytes, dtype: str) -> np.ndarray:
    """A packed column back as a NumPy array (read-only)."""
    if isinstance(raw, Binary) and raw.subtype == ZLIB_SUBTYPE:
        raw = zlib.decompress(raw)
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
    if incident is not None and not (type(incident) is str and 0 < len(incident) <= MAX_INCIDENT_ID_CHARS):
        return (f"incident_id: expected a string of 1 to {MAX_INCIDENT_ID_CHARS} characters or null, "
                f"got {str(incident)[:60]!r}")
    return None


@dataclass
class ScorePart:
    """The score records of one scores-topic message: fields shared by the batch, and one dict per record (a single
    complete record is a part without shared fields). ``position`` names the message (its Kafka position)."""

    position: str | None
    shared: dict
    items: list

    @property
    def device_id(self):
        if "device_id" in self.shared:
            return self.shared["device_id"]
        return self.items[0].get("device_id") if self.items and type(self.items[0]) is dict else None

    def record(self, i: int):
        return {**self.shared, **self.items[i]} if type(self.items[i]) is dict else self.items[i]


@dataclass
class ScoreBlock:
    """One device's valid score records as columns (`SCORE_COLUMNS`, ``incident_ids``), and the complete record of
    each anomalous row (it becomes an alert)."""

    device_id: str
    cols: dict[str, np.ndarray]
    alerts: dict[int, dict]


_REQUIRED = ("seq", "ts", "score", "threshold", "is_anomaly", "model_version")
_OPTIONAL = ("p_value", "label", "incident_id", "global_version", "scored_at")


def _column(parts: Sequence[ScorePart], name: str) -> list:
    out: list = []
    for part in parts:
        if name in part.shared:
            out += [part.shared[name]] * len(part.items)
        elif name in _REQUIRED:
            out += [item[name] for item in part.items]  # KeyError: not well-formed, checked record by record
        else:
            out += [item.get(name) for item in part.items]
    return out


_FIELDS = (*_REQUIRED, *_OPTIONAL)


def _columns(parts: Sequence[ScorePart]) -> dict[str, list]:
    """`_column` of every field at once: a part whose items all hold every field it does not share (the stream
    job's batches) is read in one `itemgetter` pass; any other part field by field."""
    out: dict[str, list] = {name: [] for name in _FIELDS}
    for part in parts:
        own = [name for name in _FIELDS if name not in part.shared]
        for name in _FIELDS:
            if name in part.shared:
                out[name] += [part.shared[name]] * len(part.items)
        try:
            rows = list(map(itemgetter(*own), part.items)) if len(own) > 1 else None
        except KeyError:  # an optional field missing somewhere (or a required one: `_column` raises then)
            rows = None
        if rows is None:
            for name in own:
                out[name] += _column([part], name)
        elif rows:
            for name, values in zip(own, zip(*rows)):
                out[name] += values
    return out


def score_block(device_id, parts: Sequence[ScorePart]) -> tuple[ScoreBlock | None, list[tuple]]:
    """The valid records of one device's parts as a `ScoreBlock` (None without any), and
    ``(position, index in its message, reason, record)`` of each record that cannot be stored.

    Well-formed parts (the stream job's) are checked column-wise, all of a device's at once; with any doubt each
    record is checked on its own (`check_score`), so each bad one gets its own reason and dead letter."""
    cols = None
    if type(device_id) is str and 0 < len(device_id) <= 200:
        try:
            # every item an object of this device (dict.get on another type raises TypeError: the slow path)
            if all(p.device_id == device_id for p in parts) and all(
                    set(map(dict.get, p.items, repeat("device_id"), repeat(device_id))) <= {device_id}
                    for p in parts):
                cols = _fast_columns(_columns(parts))
        except (KeyError, TypeError, AttributeError):
            cols = None
    if cols is not None:
        starts = np.cumsum([0] + [len(part.items) for part in parts])
        alerts = {}
        for row in np.flatnonzero(cols["is_anomaly"]).tolist():
            p = int(np.searchsorted(starts, row, side="right")) - 1
            alerts[row] = parts[p].record(row - int(starts[p]))
        if all(check_score(record) is None for record in alerts.values()):  # alerts are stored whole: check them
            return ScoreBlock(device_id, cols, alerts), []
    good, bad = [], []
    for part in parts:
        for i in range(len(part.items)):
            record = part.record(i)
            if type(record) is not dict:
                reason = f"expected an object, got {type(record).__name__}"
            elif record.get("device_id") != device_id:
                reason = f"device_id {str(record.get('device_id'))[:60]!r} in a batch of {str(device_id)[:60]!r}"
            else:
                reason = check_score(record)
            if reason is None:
                good.append(record)
            else:
                bad.append((part.position, i, reason, record))
    return (records_block(device_id, good) if good else None), bad


def records_block(device_id: str, records: Sequence[dict]) -> ScoreBlock:
    """Complete, valid score records (`check_score`) of one device as a `ScoreBlock`."""
    part = ScorePart(None, {}, list(records))
    cols = _fast_columns({name: _column([part], name) for name in (*_REQUIRED, *_OPTIONAL)}, check=False)
    return ScoreBlock(device_id, cols, {int(i): dict(records[i]) for i in np.flatnonzero(cols["is_anomaly"])})


def concat_blocks(blocks: Sequence[ScoreBlock]) -> ScoreBlock:
    """Several blocks of one device as one (rows in order; incident indexes and alert rows renumbered)."""
    if len(blocks) == 1:
        return blocks[0]
    cols: dict[str, list] = {name: [] for name in SCORE_COLUMNS}
    incident_ids: list = []
    alerts: dict[int, dict] = {}
    rows = 0
    for block in blocks:
        for name in SCORE_COLUMNS:
            values = block.cols[name]
            if name == "incident":
                values = np.where(values >= 0, values + len(incident_ids), values)
            cols[name].append(values)
        incident_ids += list(block.cols["incident_ids"])
        alerts.update({rows + row: record for row, record in block.alerts.items()})
        rows += len(block.cols["seq"])
    merged = {name: np.concatenate(parts) for name, parts in cols.items()}
    merged["incident_ids"] = np.array(incident_ids, dtype=object)
    return ScoreBlock(blocks[0].device_id, merged, alerts)


def _types(values: list) -> set:
    return set(map(type, values))


def _fast_columns(raw: dict[str, list], check: bool = True) -> dict[str, np.ndarray] | None:
    """Columns (`SCORE_COLUMNS`, ``incident_ids``) of records given as lists of field values; with `check`, None
    unless every value has its type and range (`check_score` would then pass each, alerts' extra fields aside)."""
    none = type(None)
    if check and not (_types(raw["seq"]) | _types(raw["ts"]) | _types(raw["model_version"]) <= {int}
                      and _types(raw["is_anomaly"]) <= {bool} and _types(raw["score"]) <= {float, int}
                      and _types(raw["threshold"]) | _types(raw["p_value"]) <= {float, int, none}
                      and _types(raw["global_version"]) | _types(raw["scored_at"]) <= {int, none}
                      and _types(raw["label"]) <= {int, none} and set(raw["label"]) <= {0, 1, None}
                      and _types(raw["incident_id"]) <= {str, none}):
        return None
    nan = math.nan
    try:
        cols = {"seq": np.array(raw["seq"], dtype=np.int64), "ts": np.array(raw["ts"], dtype=np.int64),
                "score": np.array(raw["score"], dtype=np.float64),
                "threshold": np.array([nan if v is None else v for v in raw["threshold"]], dtype=np.float64),
                "p_value": np.array([nan if v is None else v for v in raw["p_value"]], dtype=np.float64),
                "is_anomaly": np.array(raw["is_anomaly"], dtype=np.uint8),
                "label": np.array([NO_LABEL if v is None else v for v in raw["label"]], dtype=np.int8),
                "model_version": np.array(raw["model_version"], dtype=np.int64),
                "global_version": np.array([v or 0 for v in raw["global_version"]], dtype=np.int64),
                "scored_at": np.array([v or 0 for v in raw["scored_at"]], dtype=np.int64)}
    except OverflowError:
        return None
    if check and len(cols["seq"]):
        p = cols["p_value"][~np.isnan(cols["p_value"])]
        t = cols["threshold"][~np.isnan(cols["threshold"])]
        if (cols["seq"].min() < 0 or cols["model_version"].min() < 0 or cols["global_version"].min() < 0
                or np.abs(cols["ts"]).max() > MAX_ABS_TS or not (np.abs(cols["score"]) <= MAX_ABS_NUMBER).all()
                or not (np.abs(t) <= MAX_ABS_NUMBER).all() or not ((p > 0) & (p <= 1)).all()
                or any(not 0 < len(i) <= MAX_INCIDENT_ID_CHARS for i in raw["incident_id"] if i is not None)):
            return None
    incident_ids: dict[str, int] = {}
    cols["incident"] = np.array([NO_INCIDENT if i is None else incident_ids.setdefault(i, len(incident_ids))
                                 for i in raw["incident_id"]], dtype=np.int32)
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


def newest_buckets(heads: Iterable[dict], newest: int, max_values: int, parts: int = 1) -> list[dict[str, list]]:
    """Which `device_data` documents to read for each device's newest `newest` readings (0: all of them), in groups
    of devices whose documents hold at most `max_values` values (readings × metrics) together, and at most their
    share of all when there are `parts` readers, so each can have a group (a device with more is a group of its
    own): ``[{device_id: [_id, ...]}, ...]``. `heads`: the documents' ``_id, device_id, seq_last, n,
    metric_names``. A device's documents are taken highest ``seq_last`` first until they hold `newest` readings.

    >>> head = {"n": 10, "metric_names": ["x"]}
    >>> heads = [{**head, "_id": f"a:{s}", "device_id": "a", "seq_last": s + 9} for s in (0, 10, 20)]
    >>> heads.append({**head, "_id": "b:0", "device_id": "b", "seq_last": 4, "n": 5})
    >>> newest_buckets(heads, newest=15, max_values=24)
    [{'a': ['a:20', 'a:10']}, {'b': ['b:0']}]
    >>> newest_buckets(heads, newest=15, max_values=100, parts=2)
    [{'a': ['a:20', 'a:10']}, {'b': ['b:0']}]
    """
    by_device: dict[str, list[dict]] = {}
    for head in heads:
        by_device.setdefault(head["device_id"], []).append(head)
    chosen: dict[str, tuple[list, int]] = {}
    for device_id in sorted(by_device):
        ids, held, values = [], 0, 0
        for head in sorted(by_device[device_id], key=itemgetter("seq_last"), reverse=True):
            if newest and held >= newest:
                break
            ids.append(head["_id"])
            held += head["n"]
            values += head["n"] * len(head["metric_names"])
        chosen[device_id] = ids, values
    budget = min(max_values, math.ceil(sum(v for _, v in chosen.values()) / max(1, parts)))
    groups: list[dict[str, list]] = []
    group_values = 0
    for device_id, (ids, values) in chosen.items():
        if not groups or group_values + values > budget:
            groups.append({})
            group_values = 0
        groups[-1][device_id] = ids
        group_values += values
    return groups


def readings_of(docs: Sequence[dict], newest: int = 0) -> dict:
    """One device's `device_data` documents as arrays in seq order: ``seq, ts, label``, ``names`` (every metric
    name, first seen first) and ``values`` (readings × names, NaN = missing); only the newest `newest` (0: all)."""
    names = list(dict.fromkeys(name for d in docs for name in d["metric_names"]))
    seq, ts, label, values = [], [], [], []
    for doc in docs:
        cols = unpack_columns(doc, READING_COLUMNS)
        block = np.full((doc["n"], len(names)), math.nan)
        block[:, [names.index(n) for n in doc["metric_names"]]] = cols["values"]
        seq.append(cols["seq"]), ts.append(cols["ts"]), label.append(cols["label"]), values.append(block)
    seq_all = np.concatenate(seq)
    order = np.argsort(seq_all, kind="stable")[-newest if newest else 0:]
    return {"seq": seq_all[order], "ts": np.concatenate(ts)[order], "label": np.concatenate(label)[order],
            "names": names, "values": np.concatenate(values)[order]}
