"""The two records of the operator integrations: incidents as the router reads them (`flead.incident/1`, written by
the stream job) and operators' verdicts (`flead.feedback/1`, written by the API for the stream job).

Both topics can be written by others, so reading checks every field the router or the stream job relies on and
raises `InvalidMessage` with the reason (the caller dead-letters the record).

>>> record = decode_incident(json.dumps(sample_incident()))
>>> record["incident_id"], record["status"]
('dev-1:100', 'open')
>>> decode_incident(json.dumps({**sample_incident(), "status": "closed"}))
Traceback (most recent call last):
...
telemetry.schema.InvalidMessage: status: expected 'open' or 'resolved', got 'closed'
"""
from __future__ import annotations

import json
import math
from typing import Any

from telemetry.schema import InvalidMessage, dumps_json, load_object

INCIDENT_SCHEMA = "flead.incident/1"
FEEDBACK_SCHEMA = "flead.feedback/1"
STATUSES = ("open", "resolved")
VERDICTS = ("false_positive", "confirmed")
MAX_ID_CHARS = 500  # incident ids are "<device_id>:<start_seq>", device ids at most 200 characters
MAX_BLAMED_METRICS = 100
MAX_METRIC_NAME_CHARS = 200
MAX_INT64 = 2**63 - 1

_INTEGERS = ("start_seq", "end_seq", "start_ts", "end_ts", "n_flagged", "n_readings", "model_version",
             "global_version", "updated_at")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _text(record: dict, name: str, limit: int) -> str:
    value = record.get(name)
    if type(value) is not str or not value or len(value) > limit:
        raise InvalidMessage(f"{name}: expected a string of 1 to {limit} characters, got {_show(value)}",
                             record.get("device_id") if type(record.get("device_id")) is str else None)
    return value


def _integer(record: dict, name: str, nullable: bool = False) -> None:
    value = record.get(name)
    if value is None and nullable:
        return
    if type(value) is not int or not -MAX_INT64 <= value <= MAX_INT64:
        raise InvalidMessage(f"{name}: expected an integer, got {_show(value)}", record["device_id"])


def _number(record: dict, name: str, nullable: bool = False) -> None:
    value = record.get(name)
    if value is None and nullable:
        return
    if type(value) not in (int, float) or not math.isfinite(value):
        raise InvalidMessage(f"{name}: expected a finite number, got {_show(value)}", record["device_id"])


def check_blame(blame: Any, device_id: str | None = None) -> list[dict]:
    """``metrics_to_blame``: a list of ``{"metric": name, "share": number in [0, 1]}``."""
    if type(blame) is not list or len(blame) > MAX_BLAMED_METRICS:
        raise InvalidMessage(f"metrics_to_blame: expected a list of at most {MAX_BLAMED_METRICS} objects", device_id)
    for i, item in enumerate(blame):
        if (type(item) is not dict or type(item.get("metric")) is not str
                or not 0 < len(item["metric"]) <= MAX_METRIC_NAME_CHARS):
            raise InvalidMessage(f"metrics_to_blame[{i}]: expected {{'metric': name, 'share': number}}", device_id)
        share = item.get("share")
        if type(share) not in (int, float) or not 0.0 <= share <= 1.0:
            raise InvalidMessage(f"metrics_to_blame[{i}].share: expected a number in [0, 1], got {_show(share)}",
                                 device_id)
    return blame


def check_incident(record: dict) -> dict:
    """`record` if it is a `flead.incident/1` the router can deliver; else `InvalidMessage` naming the field."""
    if record.get("schema") != INCIDENT_SCHEMA:
        raise InvalidMessage(f"schema {_show(record.get('schema'))}, expected {INCIDENT_SCHEMA!r}")
    device_id = _text(record, "device_id", MAX_ID_CHARS)
    incident_id = _text(record, "incident_id", MAX_ID_CHARS)
    if not incident_id.startswith(device_id + ":"):
        raise InvalidMessage(f"incident_id {_show(incident_id)} is not '<device_id>:<start_seq>'", device_id)
    if record.get("status") not in STATUSES:
        raise InvalidMessage(f"status: expected 'open' or 'resolved', got {_show(record.get('status'))}", device_id)
    for name in _INTEGERS:
        _integer(record, name, nullable=name == "end_ts" and record["status"] == "open")
    _number(record, "peak_score")
    _number(record, "peak_ratio", nullable=True)
    check_blame(record.get("metrics_to_blame"), device_id)
    return record


def decode_incident(raw: bytes | str | None) -> dict:
    """The incident record of a Kafka value (see `check_incident`)."""
    return check_incident(load_object(raw))


def feedback_record(incident: dict, verdict: str, created_at: int) -> dict:
    """The `flead.feedback/1` record of an operator's verdict on a stored incident: what the stream job needs to
    mute the incident's pattern on its device (`monitoring.false_positives.apply_feedback`)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict: expected one of {VERDICTS}, got {verdict!r}")
    return {"schema": FEEDBACK_SCHEMA, "incident_id": incident["incident_id"], "device_id": incident["device_id"],
            "verdict": verdict, "peak_score": incident.get("peak_score"), "peak_ratio": incident.get("peak_ratio"),
            "metrics_to_blame": incident.get("metrics_to_blame") or [], "start_ts": incident.get("start_ts"),
            "model_version": incident.get("model_version"), "created_at": created_at}


def encode_feedback(record: dict) -> bytes:
    return dumps_json(record)


def decode_feedback(raw: bytes | str | None) -> dict:
    """A `flead.feedback/1` record of the feedback topic; `InvalidMessage` naming the field if it is wrong."""
    record = load_object(raw)
    if record.get("schema") != FEEDBACK_SCHEMA:
        raise InvalidMessage(f"schema {_show(record.get('schema'))}, expected {FEEDBACK_SCHEMA!r}")
    device_id = _text(record, "device_id", MAX_ID_CHARS)
    _text(record, "incident_id", MAX_ID_CHARS)
    if record.get("verdict") not in VERDICTS:
        raise InvalidMessage(f"verdict: expected one of {VERDICTS}, got {_show(record.get('verdict'))}", device_id)
    _number(record, "peak_score", nullable=True)
    _number(record, "peak_ratio", nullable=True)
    _integer(record, "created_at")
    check_blame(record.get("metrics_to_blame"), device_id)
    return record


def sample_incident(**fields: Any) -> dict:
    """A valid open incident (doctests, tests, docs); `fields` replace the defaults."""
    record = {"schema": INCIDENT_SCHEMA, "incident_id": "dev-1:100", "device_id": "dev-1", "status": "open",
              "start_seq": 100, "end_seq": 104, "start_ts": 1_706_659_200_000, "end_ts": 1_706_659_260_000,
              "n_flagged": 4, "n_readings": 5, "peak_score": 12.5, "peak_ratio": 2.5,
              "metrics_to_blame": [{"metric": "cpu", "share": 0.7}, {"metric": "mem", "share": 0.2}],
              "model_version": 3, "global_version": 1, "updated_at": 1_706_659_260_500}
    record.update(fields)
    if "device_id" in fields and "incident_id" not in fields:
        record["incident_id"] = f"{fields['device_id']}:{record['start_seq']}"
    return record


__all__ = ["INCIDENT_SCHEMA", "FEEDBACK_SCHEMA", "STATUSES", "VERDICTS", "check_incident", "decode_incident",
           "feedback_record", "encode_feedback", "decode_feedback", "check_blame", "sample_incident"]
