"""The two records of the operator integrations: incidents as the router reads them (`flead.incident/1`, written by
the stream job) and operators' verdicts (`flead.feedback/1`, written by the API for the stream job).

Both topics can be written by others, so reading checks every field the router or the stream job relies on and
raises `InvalidMessage` with the reason (the caller dead-letters the record).

>>> record = decode_incident(dumps_json(sample_incident()))
>>> record["incident_id"], record["status"]
('dev-1:100', 'open')
>>> decode_incident(dumps_json({**sample_incident(), "status": "closed"}))
Traceback (most recent call last):
...
telemetry.schema.InvalidMessage: status: expected 'open' or 'resolved', got 'closed'
"""
from __future__ import annotations

from typing import Any

from telemetry.schema import (INCIDENT, INCIDENT_SCHEMA, INTEGER, LIST, NUMBER, TEXT, InvalidMessage, RecordFormat,
                              dumps_json, load_object, nullable)

FEEDBACK_SCHEMA = "flead.feedback/1"
STATUSES = ("open", "resolved")
VERDICTS = ("false_positive", "confirmed")
MAX_ID_CHARS = 500  # incident ids are "<device_id>:<start_seq>", device ids at most 200 characters
MAX_BLAMED_METRICS = 100
MAX_METRIC_NAME_CHARS = 200

FEEDBACK = RecordFormat(FEEDBACK_SCHEMA, {
    "incident_id": TEXT, "device_id": TEXT, "verdict": TEXT, "peak_score": nullable(NUMBER),
    "peak_ratio": nullable(NUMBER), "metrics_to_blame": LIST, "start_ts": nullable(INTEGER),
    "model_version": nullable(INTEGER), "created_at": INTEGER})
"""An operator's verdict on an incident, for the stream job: ``verdict`` ``false_positive`` or ``confirmed``; the
incident's peak and metrics to blame are what `monitoring.false_positives.apply_feedback` needs."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


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
    return record


def decode_incident(raw: bytes | str | None) -> dict:
    """The incident record of a Kafka value (see `check_incident`)."""
    return check_incident(load_object(raw))


def _plain(value: Any) -> Any:
    """A number read back from MongoDB as a plain int or float (pymongo gives `bson.Int64` for 64-bit integers)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    return float(value) if isinstance(value, float) else value


def feedback_record(incident: dict, verdict: str, created_at: int) -> dict:
    """The `flead.feedback/1` record of an operator's verdict on a stored incident."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict: expected one of {VERDICTS}, got {verdict!r}")
    blame = [{"metric": item["metric"], "share": _plain(item["share"])}
             for item in incident.get("metrics_to_blame") or []]
    return FEEDBACK.make(incident_id=incident["incident_id"], device_id=incident["device_id"], verdict=verdict,
                         peak_score=_plain(incident.get("peak_score")), peak_ratio=_plain(incident.get("peak_ratio")),
                         metrics_to_blame=blame, start_ts=_plain(incident.get("start_ts")),
                         model_version=_plain(incident.get("model_version")), created_at=created_at)


def encode_feedback(record: dict) -> bytes:
    return dumps_json(record)


def decode_feedback(raw: bytes | str | None) -> dict:
    """A `flead.feedback/1` record of the feedback topic; `InvalidMessage` naming the field if it is wrong."""
    record = FEEDBACK.decode(raw)
    device_id = _ids(record)
    if record["verdict"] not in VERDICTS:
        raise InvalidMessage(f"verdict: expected one of {VERDICTS}, got {_show(record['verdict'])}", device_id)
    check_blame(record["metrics_to_blame"], device_id)
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

