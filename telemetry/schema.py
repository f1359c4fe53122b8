"""The telemetry message `flead.telemetry/1` and the dead letter `flead.dead-letter/1` (docs/contracts.md).

The producer encodes with this module and the stream job decodes with it, so both sides agree by construction.
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
from typing import Any, Iterable, Mapping

try:
    import orjson
except ImportError:  # the standard library does the same job, a few times slower
    orjson = None

SCHEMA = "flead.telemetry/1"
DEAD_LETTER_SCHEMA = "flead.dead-letter/1"

MAX_DEVICE_ID_CHARS = 200
MAX_METRICS = 1000
MAX_METRIC_NAME_CHARS = 200
MAX_BATCH_READINGS = 10_000
# Larger magnitudes overflow the detector's squared errors (1e300 ** 2 is inf), so they are refused, not imputed.
MAX_ABS_VALUE = 1e300
MAX_INT64 = 2**63 - 1
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


def _dumps(obj: Any) -> bytes:
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


def encode_reading(r: Reading) -> bytes:
    """One reading as a single-reading message."""
    return _dumps({"schema": SCHEMA, "device_id": r.device_id, **_reading_body(r)})


def encode_batch(device_id: str, readings: Iterable[Reading]) -> bytes:
    """Readings of ONE device (in seq order) as one batch message."""
    bodies = []
    for r in readings:
        if r.device_id != device_id:
            raise ValueError(f"encode_batch: reading of {r.device_id!r} in a batch of {device_id!r}")
        bodies.append(_reading_body(r))
    if not bodies:
        raise ValueError("encode_batch: no readings")
    return _dumps({"schema": SCHEMA, "device_id": device_id, "readings": bodies})


def _loads(raw: bytes | str) -> Any:
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
    msg = _loads(raw)
    if type(msg) is not dict:
        raise InvalidMessage(f"not a JSON object: got {type(msg).__name__}")
    schema = msg.get("schema")
    if schema != SCHEMA:
        if schema is None:
            raise InvalidMessage("missing field 'schema'")
        raise InvalidMessage(f"unknown schema {_show(schema)} (expected {SCHEMA!r})")
    device_id = _device_id(msg)
    try:
        if "readings" not in msg:
            return [Reading(device_id, _int_field(msg, "seq", "", 0), _int_field(msg, "ts", "", None),
                            _metrics(msg, ""), _label(msg, ""))]
        if "metrics" in msg:
            raise InvalidMessage("both 'metrics' and 'readings': a message is one reading or a batch, not both")
        return _batch(device_id, msg["readings"])
    except InvalidMessage as exc:
        exc.device_id = device_id
        raise


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
        out.append(Reading(device_id, seq, _int_field(item, "ts", where, None), _metrics(item, where),
                           _label(item, where)))
    return out


def dead_letter(raw: bytes | str | None, reason: str, source: str, device_id: str | None = None,
                at: int | None = None) -> bytes:
    """A `flead.dead-letter/1` record for a message that was refused; ``at`` defaults to now (epoch ms)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        text = bytes(raw).decode("utf-8", errors="replace")
    else:
        text = "" if raw is None else str(raw)
    return _dumps({
        "schema": DEAD_LETTER_SCHEMA,
        "source": source,
        "reason": reason,
        "raw": text[:MAX_DEAD_LETTER_RAW_CHARS],
        "device_id": device_id,
        "at": int(time.time() * 1000) if at is None else at,
    })
