"""Every wire format FLEAD's parts exchange (docs/contracts.md): the telemetry message `flead.telemetry/1`, the
score batch `flead.scores/1`, the dead letter `flead.dead-letter/1`, and the records of `RECORD_FORMATS`: weight
snapshots `flead.snapshot/1`, global models `flead.global-model/1`, incidents `flead.incident/1` and drift events
`flead.drift/1`.

The producer encodes with this module and the stream job decodes with it, so both sides agree by construction. A
telemetry batch travels as columns (`encode_batch`); a list of readings, as earlier producers sent, decodes the same.
Telemetry messages and score batches travel signed (`models.integrity.sign_message`: the message's last field is
its ``signature``); the decoders here ignore that field, the consumers verify it before decoding.
`decode_message` is on the stream job's hot path: it parses with orjson when installed (falling back to the
standard library for the non-standard ``NaN``/``Infinity`` tokens the contract accepts) and checks every field,
raising `InvalidMessage` with a reason a person can act on.

>>> r = Reading("omi-1", 17, 1706659200000, {"m00": 0.56, "m01": 0.5}, label=0)
>>> decode_message(encode_reading(r)) == [r]
True
>>> decode_message(b'{"schema": "flead.telemetry/1", "device_id": "omi-1", "seq": 1, "metrics": {}}')
Traceback (most recent call last):
...
telemetry.schema.InvalidMessage: missing field 'ts'
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from models.features import MAX_ABS_INPUT
from models.integrity import SIGNATURE_FIELD

try:
    import orjson
except ImportError:  # the standard library does the same job, a few times slower
    orjson = None

SCHEMA = "flead.telemetry/1"
SCORES_SCHEMA = "flead.scores/1"
DEAD_LETTER_SCHEMA = "flead.dead-letter/1"
SNAPSHOT_SCHEMA = "flead.snapshot/1"
GLOBAL_MODEL_SCHEMA = "flead.global-model/1"
INCIDENT_SCHEMA = "flead.incident/1"
DRIFT_SCHEMA = "flead.drift/1"
FEEDBACK_SCHEMA = "flead.feedback/1"

MAX_DEVICE_ID_CHARS = 200
MAX_METRICS = 1000
MAX_METRIC_NAME_CHARS = 200
MAX_BATCH_READINGS = 10_000
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a full batch of 10,000 readings of 20 metrics is about 4 MB
# Larger magnitudes would overflow the models' sums of squares (`models.features.MAX_ABS_INPUT`): refused, so that the
# producer learns of it (the detector itself would count such a value as missing).
MAX_ABS_VALUE = MAX_ABS_INPUT
MAX_INT64 = 2**63 - 1
# Event times outside 1970-01-01 .. 2100-01-01 are not telemetry but corrupt or hostile values (they overflowed
# date arithmetic downstream); a live stream narrows this further with `stream.timestamp_window_s`.
MIN_TS_MS = 0
MAX_TS_MS = 4_102_444_800_000
MAX_DEAD_LETTER_RAW_CHARS = 10_000
MAX_REASON_VALUE_CHARS = 40


class InvalidMessage(ValueError):
    """A telemetry message that breaks the contract; ``reason`` says how, ``device_id`` is set when it was readable."""

    def __init__(self, reason: str, device_id: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.device_id = device_id


@dataclass(frozen=True, slots=True)
class Reading:
    """One device's metrics at one event time: ``ts`` in epoch ms (UTC), ``seq`` counts from 0 per device.

    ``metrics`` maps metric name to float (``nan`` = missing); ``label`` (0/1) is ground truth for evaluation only.
    """

    device_id: str
    seq: int
    ts: int
    metrics: Mapping[str, float]
    label: int | None = None


def _reading_body(r: Reading) -> dict:
    body = {"seq": r.seq, "ts": r.ts, "metrics": r.metrics}
    if r.label is not None:
        body["label"] = r.label
    return body


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON; non-finite floats become ``null`` (valid JSON, decoded back as nan)."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(_nulls_for_non_finite(obj), separators=(",", ":"), allow_nan=False).encode()


def _nulls_for_non_finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nulls_for_non_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nulls_for_non_finite(v) for v in obj]
    return obj


def encode_scores(device_id: str, model_version: int, global_version: int, scored_at: int,
                  scores: list[dict]) -> bytes:
    """One device's score records of one micro-batch as one scores-topic message. Each item of `scores` holds a
    reading's ``seq, ts, score, threshold, is_anomaly, top_metrics, label``; the rest is shared by the batch."""
    return dumps_json({"schema": SCORES_SCHEMA, "device_id": device_id, "model_version": model_version,
                       "global_version": global_version, "scored_at": scored_at, "scores": scores})


def decode_scores(raw: bytes | str) -> list[dict]:
    """The complete score records (``device_id`` … ``scored_at`` each) of one scores-topic message: a batch from
    `encode_scores`, or a single record; its ``signature`` (verified by the consumer) is left out. Field values
    are checked where they are stored (storage.schemas).

    >>> decode_scores(encode_scores("omi-1", 4, 2, 1706659200450, [{"seq": 17, "score": 0.8}]))
    [{'device_id': 'omi-1', 'model_version': 4, 'global_version': 2, 'scored_at': 1706659200450, 'seq': 17, 'score': 0.8}]
    """
    msg = load_object(raw)
    msg.pop(SIGNATURE_FIELD, None)
    if "scores" not in msg:
        return [msg]
    if msg.get("schema") != SCORES_SCHEMA:
        raise InvalidMessage(f"a batch of scores with schema {_show(msg.get('schema'))} (expected {SCORES_SCHEMA!r})")
    scores = msg.pop("scores")
    del msg["schema"]
    if type(scores) is not list or not all(type(item) is dict for item in scores):
        raise InvalidMessage("scores: expected a list of objects", msg.get("device_id"))
    return [{**msg, **item} for item in scores]


def encode_reading(r: Reading) -> bytes:
    """One reading as a single-reading message."""
    return dumps_json({"schema": SCHEMA, "device_id": r.device_id, **_reading_body(r)})


def encode_batch(device_id: str, readings: Iterable[Reading]) -> bytes:
    """Readings of ONE device (in seq order) as one batch message: as columns (``"columns"``) when they all list
    the same metrics in the same order, as a device's readings do (half the bytes of the list form, and decoded
    in two thirds of the time), else as a list of readings (``"readings"``)."""
    readings = list(readings)
    if not readings:
        raise ValueError("encode_batch: no readings")
    for r in readings:
        if r.device_id != device_id:
            raise ValueError(f"encode_batch: reading of {r.device_id!r} in a batch of {device_id!r}")
    names = tuple(readings[0].metrics)
    if not all(tuple(r.metrics) == names for r in readings):
        return dumps_json({"schema": SCHEMA, "device_id": device_id, "readings": [_reading_body(r) for r in readings]})
    columns = {"metrics": list(names), "seq": [r.seq for r in readings], "ts": [r.ts for r in readings],
               "values": [list(r.metrics.values()) for r in readings]}
    if any(r.label is not None for r in readings):
        columns["label"] = [r.label for r in readings]
    return dumps_json({"schema": SCHEMA, "device_id": device_id, "columns": columns})


def load_object(raw: bytes | str | None) -> dict:
    """A Kafka record's value as a JSON object; `InvalidMessage` if it is missing, not JSON or not an object."""
    value = _loads(raw)
    if type(value) is not dict:
        raise InvalidMessage(f"not a JSON object: got {type(value).__name__}")
    return value


def _loads(raw: bytes | str | None) -> Any:
    if raw is None:
        raise InvalidMessage("no value (a tombstone record)")
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # maybe NaN/Infinity tokens or an overflowing number, which only the standard parser reads
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidMessage(f"not JSON: {exc}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_REASON_VALUE_CHARS else text[:MAX_REASON_VALUE_CHARS] + "..."


def _int_field(obj: dict, name: str, where: str, minimum: int | None) -> int:
    try:
        value = obj[name]
    except KeyError:
        raise InvalidMessage(f"missing field '{where}{name}'") from None
    if type(value) is not int:
        expected = "integer epoch milliseconds" if name == "ts" else "an integer"
        raise InvalidMessage(f"{where}{name}: expected {expected}, got {type(value).__name__} {_show(value)}")
    if (minimum is not None and value < minimum) or not -MAX_INT64 <= value <= MAX_INT64:
        raise InvalidMessage(f"{where}{name}: {value} is out of range")
    return value


def _ts_field(obj: dict, where: str) -> int:
    value = _int_field(obj, "ts", where, None)
    if not MIN_TS_MS <= value <= MAX_TS_MS:
        raise InvalidMessage(f"{where}ts: {value} is not between 1970-01-01 and 2100-01-01 "
                             f"(epoch ms {MIN_TS_MS} .. {MAX_TS_MS})")
    return value


def _metrics(obj: dict, where: str) -> dict[str, float]:
    try:
        metrics = obj["metrics"]
    except KeyError:
        raise InvalidMessage(f"missing field '{where}metrics'") from None
    if type(metrics) is not dict:
        raise InvalidMessage(f"{where}metrics: expected an object, got {type(metrics).__name__}")
    if not metrics:
        raise InvalidMessage(f"{where}metrics: empty (a reading needs at least one metric)")
    if len(metrics) > MAX_METRICS:
        raise InvalidMessage(f"{where}metrics: {len(metrics)} metrics, at most {MAX_METRICS} allowed")
    out = {}
    for name, value in metrics.items():
        if not name or len(name) > MAX_METRIC_NAME_CHARS:
            raise InvalidMessage(f"{where}metrics: metric name {_show(name)} must have 1 to {MAX_METRIC_NAME_CHARS} characters")
        kind = type(value)
        if kind is float:
            if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
                if math.isfinite(value):
                    raise InvalidMessage(f"{where}metrics.{name}: {value!r} is too large (|value| > {MAX_ABS_VALUE:g})")
                value = math.nan  # NaN, +-Infinity: missing, the detector's nan_policy decides
        elif kind is int:
            if not -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
                raise InvalidMessage(f"{where}metrics.{name}: {_show(value)} is too large (|value| > {MAX_ABS_VALUE:g})")
            value = float(value)
        elif value is None:
            value = math.nan
        else:
            raise InvalidMessage(f"{where}metrics.{name}: expected a number, got {kind.__name__}")
        out[name] = value
    return out


def _label(obj: dict, where: str) -> int | None:
    label = obj.get("label")
    if label is None or (type(label) is int and label in (0, 1)):
        return label
    raise InvalidMessage(f"{where}label: expected 0, 1 or null, got {_show(label)}")


def _device_id(msg: dict) -> str:
    try:
        device_id = msg["device_id"]
    except KeyError:
        raise InvalidMessage("missing field 'device_id'") from None
    if type(device_id) is not str:
        raise InvalidMessage(f"device_id: expected a string, got {type(device_id).__name__}")
    if not device_id.strip():
        raise InvalidMessage("device_id: empty")
    if len(device_id) > MAX_DEVICE_ID_CHARS:
        raise InvalidMessage(f"device_id: {len(device_id)} characters, at most {MAX_DEVICE_ID_CHARS} allowed")
    return device_id


def decode_message(raw: bytes | str) -> list[Reading]:
    """The readings of one telemetry message (one, or a batch of one device), checked against the contract.

    ``null``, ``NaN`` and ``Infinity`` metric values become ``float('nan')``; unknown extra fields are ignored
    (newer producers may add some). Raises `InvalidMessage` naming the first problem found.
    """
    return _readings(_loads_telemetry(raw))


def _loads_telemetry(raw: bytes | str | None) -> Any:
    """`_loads` of a telemetry message, refused unread when it is larger than `MAX_MESSAGE_BYTES`."""
    if raw is not None and len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(f"message of {len(raw):,} bytes, at most {MAX_MESSAGE_BYTES:,} (send smaller batches)")
    return _loads(raw)


def _readings(msg: Any) -> list[Reading]:
    if type(msg) is not dict:
        raise InvalidMessage(f"not a JSON object: got {type(msg).__name__}")
    schema = msg.get("schema")
    if schema != SCHEMA:
        if schema is None:
            raise InvalidMessage("missing field 'schema'")
        raise InvalidMessage(f"unknown schema {_show(schema)} (expected {SCHEMA!r})")
    device_id = _device_id(msg)
    try:
        if "columns" in msg:
            return _column_readings(_column_batch(msg))
        if "readings" not in msg:
            return [Reading(device_id, _int_field(msg, "seq", "", 0), _ts_field(msg, ""),
                            _metrics(msg, ""), _label(msg, ""))]
        if "metrics" in msg:
            raise InvalidMessage("both 'metrics' and 'readings': a message is one reading or a batch, not both")
        return _batch(device_id, msg["readings"])
    except InvalidMessage as exc:
        exc.device_id = device_id
        raise


class Columns(NamedTuple):
    """One telemetry message as columns: ``X[i, j]`` is reading i's value of metric ``names[j]`` (nan: missing)."""

    device_id: str
    names: tuple[str, ...]
    X: np.ndarray
    seqs: list[int]
    ts: list[int]
    labels: list[int | None]


def decode_columns(raw: bytes | str) -> Columns:
    """`decode_message` as columns (the stream job's and the sink's input): the same checks, errors and values. A
    batch sent as columns (what producers send), or as readings that all list the same metrics in the same order,
    is checked column-wise; anything else takes `decode_message`'s path, which names the problem or takes the
    union of the metric sets."""
    msg = _loads_telemetry(raw)
    if type(msg) is dict and "columns" in msg and msg.get("schema") == SCHEMA:
        return _column_batch(msg)
    fast = _uniform_batch_columns(msg)
    if fast is not None:
        return fast
    readings = _readings(msg)
    names = tuple(readings[0].metrics)
    if not all(tuple(r.metrics) == names for r in readings):
        names = tuple(dict.fromkeys(n for r in readings for n in r.metrics))
    X = np.array([[r.metrics.get(n, math.nan) for n in names] for r in readings], dtype=np.float64)
    return Columns(readings[0].device_id, names, X, [r.seq for r in readings], [r.ts for r in readings],
                   [r.label for r in readings])


_NUMBER_TYPES = frozenset((float, int, type(None)))
_LABEL_TYPES = frozenset((int, type(None)))


def _uniform_batch_columns(msg: Any) -> Columns | None:
    """`decode_columns` of a valid batch whose readings share one metric list; None for anything else."""
    if type(msg) is not dict or msg.get("schema") != SCHEMA or "metrics" in msg:
        return None
    device_id, items = msg.get("device_id"), msg.get("readings")
    if (type(device_id) is not str or not device_id.strip() or len(device_id) > MAX_DEVICE_ID_CHARS
            or type(items) is not list or not items or len(items) > MAX_BATCH_READINGS):
        return None
    try:
        metric_objects = [item["metrics"] for item in items]
        seqs = [item["seq"] for item in items]
        ts = [item["ts"] for item in items]
        labels = [item.get("label") for item in items]
    except (TypeError, KeyError, AttributeError):  # an item that is not an object, or lacks a field
        return None
    first = metric_objects[0]
    if type(first) is not dict or not first or len(first) > MAX_METRICS:
        return None
    names = tuple(first)
    if (not all(type(m) is dict and tuple(m) == names for m in metric_objects)
            or not all(0 < len(name) <= MAX_METRIC_NAME_CHARS for name in names)):
        return None
    values = [list(m.values()) for m in metric_objects]
    if (not set(map(type, chain.from_iterable(values))) <= _NUMBER_TYPES  # bool is not int here: refused
            or set(map(type, seqs)) != {int} or set(map(type, ts)) != {int}
            or not set(map(type, labels)) <= _LABEL_TYPES or not set(labels) <= {None, 0, 1}):
        return None
    # Python's min/max on the short lists: cheaper than NumPy's per-call overhead, and no int64 overflow
    if (min(seqs) < 0 or max(seqs) > MAX_INT64 or min(ts) < MIN_TS_MS or max(ts) > MAX_TS_MS
            or any(a >= b for a, b in zip(seqs, islice(seqs, 1, None)))):
        return None
    X, too_large = _value_matrix(values)
    return None if too_large else Columns(device_id, names, X, seqs, ts, labels)


def _column_batch(msg: dict) -> Columns:
    """A batch sent as columns (`encode_batch`), checked column by column with `decode_message`'s rules; the
    reason of an `InvalidMessage` names the column (and the reading and metric of a bad value)."""
    device_id = _device_id(msg)
    try:
        if "readings" in msg or "metrics" in msg:
            raise InvalidMessage("'columns' beside 'readings' or 'metrics': a message is one reading, a list of "
                                 "readings or a batch as columns")
        columns = msg["columns"]
        if type(columns) is not dict:
            raise InvalidMessage(f"columns: expected an object, got {type(columns).__name__}")
        names = _column(columns, "metrics", (str,), 1, MAX_METRICS)
        if not all(0 < len(name) <= MAX_METRIC_NAME_CHARS for name in names):
            bad = next(name for name in names if not 0 < len(name) <= MAX_METRIC_NAME_CHARS)
            raise InvalidMessage(f"columns.metrics: metric name {_show(bad)} must have 1 to {MAX_METRIC_NAME_CHARS} "
                                 "characters")
        if len(set(names)) != len(names):
            raise InvalidMessage("columns.metrics: a metric is named twice")
        seqs = _column(columns, "seq", (int,), 1, MAX_BATCH_READINGS)
        n = len(seqs)
        ts = _column(columns, "ts", (int,), n, n)
        labels = _column(columns, "label", (int, type(None)), n, n) if columns.get("label") is not None else [None] * n
        values = _column(columns, "values", (list,), n, n)
        if min(seqs) < 0 or max(seqs) > MAX_INT64:
            raise InvalidMessage(f"columns.seq: {min(seqs) if min(seqs) < 0 else max(seqs)} is out of range")
        previous = next((i for i in range(1, n) if seqs[i] <= seqs[i - 1]), None)
        if previous is not None:
            raise InvalidMessage(f"columns.seq[{previous}]: {seqs[previous]} does not increase (previous "
                                 f"{seqs[previous - 1]})")
        if min(ts) < MIN_TS_MS or max(ts) > MAX_TS_MS:
            bad = min(ts) if min(ts) < MIN_TS_MS else max(ts)
            raise InvalidMessage(f"columns.ts: {bad} is not between 1970-01-01 and 2100-01-01 (epoch ms {MIN_TS_MS} "
                                 f".. {MAX_TS_MS})")
        if not set(labels) <= {None, 0, 1}:
            bad = next(label for label in labels if label not in (None, 0, 1))
            raise InvalidMessage(f"columns.label: expected 0, 1 or null, got {_show(bad)}")
        short = next((i for i, row in enumerate(values) if len(row) != len(names)), None)
        if short is not None:
            raise InvalidMessage(f"columns.values[{short}]: {len(values[short])} values for {len(names)} metrics")
        if not set(map(type, chain.from_iterable(values))) <= _NUMBER_TYPES:  # bool is not int here: refused
            i, j = next((i, j) for i, row in enumerate(values) for j, v in enumerate(row)
                        if type(v) not in _NUMBER_TYPES)
            raise InvalidMessage(f"columns.values[{i}][{j}] ({names[j]}): expected a number, got "
                                 f"{type(values[i][j]).__name__}")
        X, too_large = _value_matrix(values)
        if too_large:
            i, j = too_large
            raise InvalidMessage(f"columns.values[{i}][{j}] ({names[j]}): {_show(values[i][j])} is too large "
                                 f"(|value| > {MAX_ABS_VALUE:g})")
    except InvalidMessage as exc:
        exc.device_id = device_id
        raise
    return Columns(device_id, tuple(names), X, seqs, ts, labels)


def _value_matrix(values: list[list]) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """Rows of numbers or nulls as a float64 matrix: null and +-Infinity become NaN (missing: the detector's
    nan_policy decides). Or, if a value is finite and beyond MAX_ABS_VALUE, None and where the first such is."""
    try:
        X = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range
        return None, next((i, j) for i, row in enumerate(values) for j, v in enumerate(row)
                          if type(v) is int and abs(v) > MAX_ABS_VALUE)
    big = np.abs(X) > MAX_ABS_VALUE  # +-Infinity too; NaN compares False
    if big.any():
        finite = big & np.isfinite(X)
        if finite.any():
            return None, tuple(int(k) for k in np.argwhere(finite)[0])
        X[big] = math.nan
    return X, None


def _column(columns: dict, name: str, types: tuple[type, ...], at_least: int, at_most: int) -> list:
    """``columns[name]``: a list of `at_least` to `at_most` items of `types` (bool is not int here)."""
    try:
        column = columns[name]
    except KeyError:
        raise InvalidMessage(f"missing field 'columns.{name}'") from None
    if type(column) is not list:
        raise InvalidMessage(f"columns.{name}: expected a list, got {type(column).__name__}")
    if not at_least <= len(column) <= at_most:
        wanted = f"{at_least}" if at_least == at_most else f"{at_least} to {at_most:,}"
        raise InvalidMessage(f"columns.{name}: {len(column):,} items, expected {wanted}")
    if not set(map(type, column)) <= set(types):
        bad = next(item for item in column if type(item) not in types)
        raise InvalidMessage(f"columns.{name}: expected {' or '.join(t.__name__ for t in types)} items, got "
                             f"{type(bad).__name__} {_show(bad)}")
    return column


def _column_readings(columns: Columns) -> list[Reading]:
    """A batch of columns as its readings (a missing value as `math.nan`, as `decode_message` gives it)."""
    return [Reading(columns.device_id, seq, ts, {name: value if value == value else math.nan
                                                 for name, value in zip(columns.names, row)}, label)
            for seq, ts, row, label in zip(columns.seqs, columns.ts, columns.X.tolist(), columns.labels)]


def _batch(device_id: str, items: Any) -> list[Reading]:
    if type(items) is not list:
        raise InvalidMessage(f"readings: expected a list, got {type(items).__name__}")
    if not items:
        raise InvalidMessage("readings: empty batch")
    if len(items) > MAX_BATCH_READINGS:
        raise InvalidMessage(f"readings: {len(items)} readings, at most {MAX_BATCH_READINGS} per message")
    out = []
    previous_seq = -1
    for i, item in enumerate(items):
        where = f"readings[{i}]."
        if type(item) is not dict:
            raise InvalidMessage(f"readings[{i}]: expected an object, got {type(item).__name__}")
        seq = _int_field(item, "seq", where, 0)
        if seq <= previous_seq:
            raise InvalidMessage(f"{where}seq: {seq} does not increase (previous {previous_seq})")
        previous_seq = seq
        out.append(Reading(device_id, seq, _ts_field(item, where), _metrics(item, where),
                           _label(item, where)))
    return out


def dead_letter(raw: bytes | str | None, reason: str, source: str, device_id: str | None = None,
                at: int | None = None) -> bytes:
    """A `flead.dead-letter/1` record for a message that was refused; ``at`` defaults to now (epoch ms)."""
    return dumps_json(dead_letter_record(raw, reason, source, device_id, at))


def dead_letter_record(raw: bytes | str | None, reason: str, source: str, device_id: str | None = None,
                       at: int | None = None) -> dict:
    """`dead_letter` as a dict (for writers that store it directly); ``raw`` is cut to 10,000 characters."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        text = bytes(raw).decode("utf-8", errors="replace")
    else:
        text = "" if raw is None else str(raw)
    return DEAD_LETTER.make(source=source, reason=reason, raw=text[:MAX_DEAD_LETTER_RAW_CHARS], device_id=device_id,
                            at=int(time.time() * 1000) if at is None else at)


# -- records: snapshots, global models, incidents, drift events ------------------------------------------------

class FieldType(NamedTuple):
    """What a record field may hold: a name for messages, the accepted Python types, and whether null is allowed."""

    name: str
    types: tuple[type, ...]
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if type(value) is float and not math.isfinite(value):
            return False
        if type(value) is int and not -MAX_INT64 <= value <= MAX_INT64:
            return False
        return type(value) in self.types  # exact types: bool is not an int here


INTEGER = FieldType("an integer", (int,))
NUMBER = FieldType("a finite number", (int, float))
TEXT = FieldType("a string", (str,))
LIST = FieldType("a list", (list,))


def nullable(field: FieldType) -> FieldType:
    return FieldType(f"{field.name} or null", field.types, True)


class RecordFormat(NamedTuple):
    """One record wire format: its schema tag, the fields every record has and the optional ones (name → type).

    Fields not listed pass through unchecked (a newer writer may add some); `decode` checks the listed ones."""

    schema: str
    required: Mapping[str, FieldType]
    optional: Mapping[str, FieldType] = {}

    def make(self, **fields: Any) -> dict:
        """The record with its schema tag; `ValueError` naming the field if one is missing or of the wrong type."""
        try:
            return self.check({"schema": self.schema, **fields})
        except InvalidMessage as exc:
            raise ValueError(f"{self.schema}: {exc.reason}") from None

    def encode(self, **fields: Any) -> bytes:
        return dumps_json(self.make(**fields))

    def decode(self, raw: bytes | str | None) -> dict:
        """The record of a Kafka value; `InvalidMessage` if it is not this format or a field is wrong."""
        return self.check(load_object(raw))

    def check(self, record: dict) -> dict:
        if record.get("schema") != self.schema:
            raise InvalidMessage(f"schema {_show(record.get('schema'))}, expected {self.schema!r}")
        for name, field in self.required.items():
            if name not in record:
                raise InvalidMessage(f"missing field {name!r}", _readable_device(record))
            if not field.accepts(record[name]):
                raise InvalidMessage(f"{name}: expected {field.name}, got {_show(record[name])}",
                                     _readable_device(record))
        for name, field in self.optional.items():
            if name in record and not field.accepts(record[name]):
                raise InvalidMessage(f"{name}: expected {field.name}, got {_show(record[name])}",
                                     _readable_device(record))
        return record


def _readable_device(record: dict) -> str | None:
    device_id = record.get("device_id")
    return device_id if type(device_id) is str else None


SNAPSHOT = RecordFormat(SNAPSHOT_SCHEMA, {
    "device_id": TEXT, "version": INTEGER, "global_version": INTEGER, "n_samples": INTEGER, "n_seen": INTEGER,
    "loss": nullable(NUMBER), "weights": TEXT, "created_at": INTEGER})
"""A device's weight snapshot: ``weights`` is the base64 `models.serialization` blob of its federated weights,
``n_samples`` the readings learned since its previous snapshot, ``n_seen`` since it was created."""

GLOBAL_MODEL = RecordFormat(GLOBAL_MODEL_SCHEMA, {
    "version": INTEGER, "weights": TEXT, "created_at": INTEGER}, {
    "round_id": TEXT, "strategy": TEXT, "participants": LIST, "rejected": LIST, "n_samples": INTEGER,
    "dp_epsilon": nullable(NUMBER), "cluster": nullable(INTEGER), "members": nullable(LIST), "part": INTEGER,
    "parts": INTEGER})
"""A global model of the aggregator: ``cluster`` is null for the fleet model, else the cluster whose ``members``
(device ids) adopt it. A cluster with many members is sent as ``parts`` records (``part`` 0, 1, ...), identical
but for their share of ``members``: its members are the union of theirs. ``participants`` and ``rejected`` list at most
`aggregation.listed_devices` devices; ``n_participants`` and ``n_rejected`` count them all."""

INCIDENT = RecordFormat(INCIDENT_SCHEMA, {
    "incident_id": TEXT, "device_id": TEXT, "status": TEXT, "start_seq": INTEGER, "end_seq": INTEGER,
    "start_ts": INTEGER, "end_ts": INTEGER, "n_flagged": INTEGER, "n_readings": INTEGER, "peak_score": NUMBER,
    "peak_ratio": nullable(NUMBER), "metrics_to_blame": LIST, "model_version": INTEGER,
    "global_version": INTEGER, "updated_at": INTEGER}, {"stuck_metrics": LIST})
"""One state of an incident (flagged readings of one device close in time): ``status`` ``open`` or
``resolved``; ``incident_id`` = ``<device_id>:<start_seq>``; a later state replaces an earlier one.
``stuck_metrics`` (optional, `check_stuck`): the metrics that stopped moving in it, ``{"metric", "repeats",
"usual"}``: its longest run of repeated values in the incident and the longest the device had before."""

DRIFT = RecordFormat(DRIFT_SCHEMA, {
    "event_id": TEXT, "device_id": TEXT, "seq": INTEGER, "ts": INTEGER, "reason": TEXT,
    "flag_rate": NUMBER, "target_rate": NUMBER, "window": INTEGER, "detected_at": INTEGER,
    "model_version": INTEGER})
"""A device's detector re-baselined itself after a label-free drift test fired; ``event_id`` =
``<device_id>:<seq>``."""

# -- incidents and operators' feedback: the rules their readers rely on --------------------------------------

STATUSES = ("open", "resolved")
VERDICTS = ("false_positive", "confirmed")
MAX_ID_CHARS = 500  # incident ids are "<device_id>:<start_seq>", device ids at most 200 characters
MAX_BLAMED_METRICS = 100

FEEDBACK = RecordFormat(FEEDBACK_SCHEMA, {
    "incident_id": TEXT, "device_id": TEXT, "verdict": TEXT, "peak_score": nullable(NUMBER),
    "peak_ratio": nullable(NUMBER), "metrics_to_blame": LIST, "start_ts": nullable(INTEGER),
    "model_version": nullable(INTEGER), "created_at": INTEGER})
"""An operator's verdict on an incident, for the stream job: ``verdict`` ``false_positive`` or ``confirmed``; the
incident's peak and metrics to blame are what `scoring.feedback.apply_feedback` needs."""


def _ids(record: dict) -> str:
    """The record's device id, after checking it and the incident id are non-empty and of bounded length."""
    for name in ("device_id", "incident_id"):
        if not 0 < len(record[name]) <= MAX_ID_CHARS:
            raise InvalidMessage(f"{name}: expected 1 to {MAX_ID_CHARS} characters, got {len(record[name])}",
                                 record["device_id"] or None)
    return record["device_id"]


def check_blame(blame: list, device_id: str | None = None) -> list[dict]:
    """``metrics_to_blame``: at most `MAX_BLAMED_METRICS` items ``{"metric": name, "share": number in [0, 1]}``."""
    if len(blame) > MAX_BLAMED_METRICS:
        raise InvalidMessage(f"metrics_to_blame: {len(blame)} items, at most {MAX_BLAMED_METRICS}", device_id)
    for i, item in enumerate(blame):
        if (type(item) is not dict or type(item.get("metric")) is not str
                or not 0 < len(item["metric"]) <= MAX_METRIC_NAME_CHARS):
            raise InvalidMessage(f"metrics_to_blame[{i}]: expected {{'metric': name, 'share': number}}", device_id)
        share = item.get("share")
        if type(share) not in (int, float) or not 0.0 <= share <= 1.0:
            raise InvalidMessage(f"metrics_to_blame[{i}].share: expected a number in [0, 1], got {_show(share)}",
                                 device_id)
    return blame


def check_stuck(stuck: list, device_id: str | None = None) -> list[dict]:
    """``stuck_metrics``: at most `MAX_BLAMED_METRICS` items ``{"metric": name, "repeats": int >= 1, "usual": int
    >= 0}``."""
    if len(stuck) > MAX_BLAMED_METRICS:
        raise InvalidMessage(f"stuck_metrics: {len(stuck)} items, at most {MAX_BLAMED_METRICS}", device_id)
    for i, item in enumerate(stuck):
        if (type(item) is not dict or type(item.get("metric")) is not str
                or not 0 < len(item["metric"]) <= MAX_METRIC_NAME_CHARS
                or type(item.get("repeats")) is not int or not 1 <= item["repeats"] <= MAX_INT64
                or type(item.get("usual")) is not int or not 0 <= item["usual"] <= MAX_INT64):
            raise InvalidMessage(f"stuck_metrics[{i}]: expected {{'metric': name, 'repeats': integer >= 1, "
                                 f"'usual': integer >= 0}}", device_id)
    return stuck


def check_incident(record: dict) -> dict:
    """`record` if it is a `flead.incident/1` (`telemetry.schema.INCIDENT`) the router can deliver: also a known
    status, ``incident_id`` = ``<device_id>:...``, well-formed metrics to blame; else `InvalidMessage`."""
    INCIDENT.check(record)
    device_id = _ids(record)
    if not record["incident_id"].startswith(device_id + ":"):
        raise InvalidMessage(f"incident_id {_show(record['incident_id'])} is not '<device_id>:<start_seq>'", device_id)
    if record["status"] not in STATUSES:
        raise InvalidMessage(f"status: expected 'open' or 'resolved', got {_show(record['status'])}", device_id)
    check_blame(record["metrics_to_blame"], device_id)
    check_stuck(record.get("stuck_metrics") or [], device_id)
    return record


def decode_incident(raw: bytes | str | None) -> dict:
    """The incident record of a Kafka value (see `check_incident`)."""
    return check_incident(load_object(raw))


def decode_feedback(raw: bytes | str | None) -> dict:
    """A `flead.feedback/1` record of the feedback topic; `InvalidMessage` naming the field if it is wrong."""
    return check_feedback(load_object(raw))


def check_feedback(record: dict) -> dict:
    """`record` if it is a `flead.feedback/1` the stream job can apply (`FEEDBACK`, a known verdict, well-formed
    metrics to blame); else `InvalidMessage`."""
    FEEDBACK.check(record)
    device_id = _ids(record)
    if record["verdict"] not in VERDICTS:
        raise InvalidMessage(f"verdict: expected one of {VERDICTS}, got {_show(record['verdict'])}", device_id)
    check_blame(record["metrics_to_blame"], device_id)
    return record


DEAD_LETTER = RecordFormat(DEAD_LETTER_SCHEMA, {
    "source": TEXT, "reason": TEXT, "raw": TEXT, "device_id": nullable(TEXT), "at": INTEGER})
"""A message some part refused: ``source`` is the topic (or part) it came from, ``raw`` its value, cut."""

RECORD_FORMATS: dict[str, RecordFormat] = {f.schema: f for f in (SNAPSHOT, GLOBAL_MODEL, INCIDENT, DRIFT,
                                                                 DEAD_LETTER, FEEDBACK)}
