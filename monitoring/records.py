"""Builders of the operator integrations' records: an operator's verdict (`flead.feedback/1`, written by the API for
the stream job) from a stored incident, and a sample incident for examples and tests. Both formats, and the rules
their readers check (a hostile writer may reach either topic), are in `telemetry.schema`.

>>> from telemetry.schema import decode_incident
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

from telemetry.schema import FEEDBACK, INCIDENT_SCHEMA, VERDICTS, dumps_json


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

