"""JSON schemas and indexes of FLEAD's MongoDB collections (keys are `mongo.collections` keys of the config).

Each schema is a MongoDB ``$jsonSchema`` document. A real MongoDB enforces it server-side; servers that do not
implement validators (FerretDB v1) get the same check client-side from `check_document` before every write,
so a document that violates its collection's schema is refused with the same clear error everywhere.
"""
from __future__ import annotations

import math
import re
from typing import Any

NUMBER = ["double", "int", "long", "decimal"]
INT = ["int", "long"]

_ids = {"bsonType": "string", "minLength": 1, "maxLength": 200}
_weights = {"bsonType": "string", "minLength": 1}  # base64 of a models.serialization blob
_top_metrics = {"bsonType": "array", "items": {"bsonType": "object", "required": ["metric", "share"],
                                              "properties": {"metric": {"bsonType": "string"},
                                                             "share": {"bsonType": NUMBER}}}}
_score_record = {
    "bsonType": "object",
    "required": ["device_id", "seq", "ts", "score", "threshold", "is_anomaly", "model_version"],
    "properties": {
        "device_id": _ids, "seq": {"bsonType": INT, "minimum": 0}, "ts": {"bsonType": INT},
        # threshold is null while a device warms up (no cut fitted yet: nothing can be flagged)
        "score": {"bsonType": NUMBER}, "threshold": {"bsonType": NUMBER + ["null"]}, "is_anomaly": {"bsonType": "bool"},
        "top_metrics": _top_metrics, "model_version": {"bsonType": INT, "minimum": 0},
        "global_version": {"bsonType": INT, "minimum": 0}, "label": {"bsonType": INT + ["null"]},
        "scored_at": {"bsonType": INT}, "p_value": {"bsonType": NUMBER + ["null"]},
        "incident_id": {"bsonType": ["string", "null"]},
    },
}
_binary = {"bsonType": "binData"}
# One device's readings or score records of one sink flush, values packed (storage.buckets).
_bucket_head = {"device_id": _ids, "seq_first": {"bsonType": INT, "minimum": 0},
                "seq_last": {"bsonType": INT, "minimum": 0}, "ts_min": {"bsonType": INT}, "ts_max": {"bsonType": INT},
                "n": {"bsonType": INT, "minimum": 1}, "generation": {"bsonType": INT, "minimum": 0},
                "stored_at": {"bsonType": INT}}
_bucket_required = ["device_id", "seq_first", "seq_last", "ts_min", "ts_max", "n", "generation", "stored_at",
                    "columns"]
_score_rollup = {
    "bsonType": "object",
    "required": ["ts", "n", "anomalies", "score_sum", "score_max", "generation", "stored_at"],
    "properties": {"device_id": _ids, "ts": {"bsonType": INT}, "n": {"bsonType": INT, "minimum": 1},
                   "anomalies": {"bsonType": INT, "minimum": 0}, "score_sum": {"bsonType": NUMBER},
                   "score_max": {"bsonType": NUMBER}, "threshold_max": {"bsonType": NUMBER},
                   "anomaly_score_max": {"bsonType": NUMBER}, "generation": {"bsonType": INT, "minimum": 0},
                   "stored_at": {"bsonType": INT}},
}

SCHEMAS: dict[str, dict] = {
    "score_rollups": _score_rollup,
    "daily_rollups": _score_rollup,
    "fleet_rollups": _score_rollup,
    "metric_rollups": {
        "bsonType": "object",
        "required": ["device_id", "ts", "n", "metrics", "generation", "stored_at"],
        "properties": {"device_id": _ids, "ts": {"bsonType": INT}, "n": {"bsonType": INT, "minimum": 1},
                       "generation": {"bsonType": INT, "minimum": 0}, "stored_at": {"bsonType": INT},
                       "metrics": {"bsonType": "array", "items": {
                           "bsonType": "object", "required": ["name", "n", "sum"],
                           "properties": {"name": {"bsonType": "string"}, "n": {"bsonType": INT, "minimum": 1},
                                          "sum": {"bsonType": NUMBER}, "device_id": _ids,
                                          "ts": {"bsonType": INT}}}}},
    },
    "device_data": {
        "bsonType": "object",
        "required": _bucket_required + ["metric_names"],
        "properties": {**_bucket_head, "metric_names": {"bsonType": "array", "items": {"bsonType": "string"}},
                       "columns": {"bsonType": "object", "required": ["seq", "ts", "label", "values"],
                                   "properties": {name: _binary for name in ("seq", "ts", "label", "values")}}},
    },
    "predictions": {
        "bsonType": "object",
        "required": _bucket_required + ["anomalies", "incident_ids"],
        "properties": {**_bucket_head, "anomalies": {"bsonType": INT, "minimum": 0},
                       "incident_ids": {"bsonType": "array", "items": {"bsonType": "string"}},
                       "columns": {"bsonType": "object", "required": [
                           "seq", "ts", "score", "threshold", "p_value", "is_anomaly", "label", "model_version",
                           "global_version", "scored_at", "incident"]}},
    },
    "alerts": _score_record,
    "incidents": {
        "bsonType": "object",
        "required": ["incident_id", "device_id", "status", "start_seq", "end_seq", "start_ts", "end_ts",
                     "n_flagged", "peak_score"],
        "properties": {"incident_id": {"bsonType": "string", "minLength": 1, "maxLength": 500}, "device_id": _ids,
                       "status": {"bsonType": "string", "enum": ["open", "resolved"]},
                       "start_seq": {"bsonType": INT, "minimum": 0}, "end_seq": {"bsonType": INT, "minimum": 0},
                       "start_ts": {"bsonType": INT}, "end_ts": {"bsonType": INT},
                       "n_flagged": {"bsonType": INT, "minimum": 0}, "n_readings": {"bsonType": INT, "minimum": 0},
                       "peak_score": {"bsonType": NUMBER}, "peak_ratio": {"bsonType": NUMBER + ["null"]},
                       "metrics_to_blame": _top_metrics, "model_version": {"bsonType": INT + ["null"]},
                       "global_version": {"bsonType": INT + ["null"]}, "updated_at": {"bsonType": INT},
                       "stuck_metrics": {"bsonType": "array", "items": {
                           "bsonType": "object", "required": ["metric", "repeats", "usual"],
                           "properties": {"metric": {"bsonType": "string"}, "repeats": {"bsonType": INT},
                                          "usual": {"bsonType": INT}}}},
                       "stored_at": {"bsonType": INT}},
    },
    "drift_events": {
        "bsonType": "object",
        "required": ["event_id", "device_id", "seq", "ts", "reason"],
        "properties": {"event_id": {"bsonType": "string", "minLength": 1, "maxLength": 500}, "device_id": _ids,
                       "seq": {"bsonType": INT, "minimum": 0}, "ts": {"bsonType": INT},
                       "reason": {"bsonType": "string", "minLength": 1}, "flag_rate": {"bsonType": NUMBER + ["null"]},
                       "target_rate": {"bsonType": NUMBER + ["null"]}, "window": {"bsonType": INT + ["null"]},
                       "detected_at": {"bsonType": INT}, "model_version": {"bsonType": INT + ["null"]},
                       "stored_at": {"bsonType": INT}},
    },
    "local_models": {
        "bsonType": "object",
        "required": ["device_id", "version", "n_samples", "weights", "created_at"],
        "properties": {"device_id": _ids, "version": {"bsonType": INT, "minimum": 0},
                       "global_version": {"bsonType": INT, "minimum": 0},
                       "n_samples": {"bsonType": INT, "minimum": 0}, "n_seen": {"bsonType": INT, "minimum": 0},
                       "loss": {"bsonType": NUMBER + ["null"]}, "weights": _weights,
                       "created_at": {"bsonType": INT}},
    },
    "global_models": {
        "bsonType": "object",
        "required": ["version", "strategy", "participants", "weights", "created_at"],
        "properties": {"version": {"bsonType": INT, "minimum": 1}, "round_id": {"bsonType": "string"},
                       "strategy": {"bsonType": "string"}, "participants": {"bsonType": "array"},
                       "rejected": {"bsonType": "array"}, "n_samples": {"bsonType": INT, "minimum": 0},
                       "weights": _weights, "created_at": {"bsonType": INT},
                       "dp_epsilon": {"bsonType": NUMBER + ["null"]}, "cluster": {"bsonType": INT + ["null"]},
                       "part": {"bsonType": INT, "minimum": 0}, "parts": {"bsonType": INT, "minimum": 1}},
    },
    "aggregation_history": {
        "bsonType": "object",
        "required": ["round_id", "strategy", "started_at"],
        "properties": {"round_id": {"bsonType": "string"}, "version": {"bsonType": INT + ["null"]},
                       "strategy": {"bsonType": "string"}, "n_participants": {"bsonType": INT, "minimum": 0},
                       "n_rejected": {"bsonType": INT, "minimum": 0}, "started_at": {"bsonType": INT},
                       "finished_at": {"bsonType": INT}},
    },
    "metrics": {
        "bsonType": "object",
        "required": ["scope", "created_at"],
        "properties": {"scope": {"bsonType": "string", "enum": ["fleet", "device"]},
                       "model_version": {"bsonType": INT + ["null"]}, "device_id": {"bsonType": ["string", "null"]},
                       "created_at": {"bsonType": INT}},
    },
    "dead_letters": {
        "bsonType": "object",
        "required": ["reason", "raw", "at"],
        "properties": {"reason": {"bsonType": "string", "minLength": 1}, "raw": {"bsonType": "string"},
                       "source": {"bsonType": "string"}, "device_id": {"bsonType": ["string", "null"]},
                       "at": {"bsonType": INT}, "stored_at": {"bsonType": INT}},
    },
    "sink_state": {"bsonType": "object", "required": ["_id"], "properties": {"_id": {"bsonType": "string"}}},
    # storage/summaries.py: "fleet" (series, devices) and "incidents" (open, open_incidents, newest)
    "fleet_summary": {"bsonType": "object", "required": ["_id", "updated_at"],
                      "properties": {"_id": {"bsonType": "string", "enum": ["fleet", "incidents"]},
                                     "updated_at": {"bsonType": INT}, "generation": {"bsonType": INT},
                                     "series": {"bsonType": "array"}, "devices": {"bsonType": "array"},
                                     "open": {"bsonType": "array"}, "open_incidents": {"bsonType": INT},
                                     "newest": {"bsonType": "array"}}},
    "device_summary": {"bsonType": "object",
                       "required": ["_id", "generation", "updated_at", "n", "anomalies", "scores", "metrics"],
                       "properties": {"_id": _ids, "generation": {"bsonType": INT}, "updated_at": {"bsonType": INT},
                                      "n": {"bsonType": INT}, "anomalies": {"bsonType": INT},
                                      "scores": {"bsonType": "array"}, "metrics": {"bsonType": "array"}}},
}

# (keys, options) per collection; _id carries each collection's natural key already.
# (The embedded server does not use them to filter, a real MongoDB does.)
INDEXES: dict[str, list[tuple[list[tuple[str, int]], dict]]] = {
    "device_data": [([("device_id", 1), ("seq_last", -1)], {}), ([("stored_at", 1)], {})],
    "predictions": [([("device_id", 1), ("seq_last", -1)], {}), ([("stored_at", 1)], {}), ([("generation", 1)], {})],
    "alerts": [([("device_id", 1), ("ts", -1)], {}), ([("ts", -1)], {}), ([("stored_at", 1)], {})],
    "incidents": [([("device_id", 1), ("start_ts", -1)], {}), ([("stored_at", 1)], {})],
    "drift_events": [([("device_id", 1), ("ts", -1)], {}), ([("stored_at", 1)], {})],
    "local_models": [([("device_id", 1), ("version", -1)], {}), ([("created_at", -1)], {})],
    "global_models": [([("created_at", -1)], {})],
    "aggregation_history": [([("started_at", -1)], {})],
    "metrics": [([("model_version", -1), ("scope", 1)], {}), ([("created_at", -1)], {})],
    "dead_letters": [([("at", -1)], {}), ([("reason", 1)], {}), ([("stored_at", 1)], {})],
    "score_rollups": [([("device_id", 1), ("ts", -1)], {}), ([("stored_at", 1)], {})],
    "daily_rollups": [([("device_id", 1), ("ts", -1)], {}), ([("stored_at", 1)], {})],
    "fleet_rollups": [([("ts", -1)], {}), ([("stored_at", 1)], {})],
    "metric_rollups": [([("device_id", 1), ("ts", -1)], {}), ([("stored_at", 1)], {})],
    "sink_state": [],
    "fleet_summary": [],
    "device_summary": [],
}

_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "object": (dict,), "array": (list, tuple), "bool": (bool,), "null": (type(None),),
    "int": (int,), "long": (int,), "double": (float, int), "decimal": (float, int), "binData": (bytes,),
}


class SchemaViolation(ValueError):
    """A document that does not match its collection's schema."""


def _type_ok(value: Any, bson_types: str | list[str]) -> bool:
    names = [bson_types] if isinstance(bson_types, str) else bson_types
    if isinstance(value, bool):
        return "bool" in names
    if hasattr(value, "dtype"):  # NumPy scalars: accept numbers by kind
        value = value.item()
    return any(isinstance(value, _PY_TYPES[name]) for name in names)


def check_document(collection: str, doc: dict, where: str | None = None) -> None:
    """Raise `SchemaViolation` naming the collection (or `where`) and field if `doc` breaks the collection's
    schema."""
    _check(SCHEMAS[collection], doc, where or collection)


def _check(schema: dict, value: Any, where: str) -> None:
    if "bsonType" in schema and not _type_ok(value, schema["bsonType"]):
        raise SchemaViolation(f"{where}: expected {schema['bsonType']}, got {type(value).__name__} ({value!r:.80})")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaViolation(f"{where}: not a finite number ({value})")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaViolation(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        raise SchemaViolation(f"{where}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaViolation(f"{where}: empty string")
        if len(value) > schema.get("maxLength", math.inf):
            raise SchemaViolation(f"{where}: longer than {schema['maxLength']} characters")
    if isinstance(value, dict):
        for field in schema.get("required", ()):
            if field not in value:
                raise SchemaViolation(f"{where}: missing required field '{field}'")
        for field, sub in schema.get("properties", {}).items():
            if field in value:
                _check(sub, value[field], f"{where}.{field}")
    if isinstance(value, (list, tuple)) and "items" in schema:
        for i, item in enumerate(value):
            _check(schema["items"], item, f"{where}[{i}]")


FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
MAX_FIELD_DEPTH = 8


def check_field_names(doc: Any, where: str, depth: int = 0) -> None:
    """Raise `SchemaViolation` if a field name (at any depth) is not a plain identifier of at most 64 characters:
    records from Kafka are stored with their fields, and names with ``$`` or ``.`` are operators or paths to
    MongoDB. Nesting deeper than `MAX_FIELD_DEPTH` is refused as well."""
    if depth > MAX_FIELD_DEPTH:
        raise SchemaViolation(f"{where}: nested deeper than {MAX_FIELD_DEPTH} levels")
    if isinstance(doc, dict):
        for name, value in doc.items():
            if not isinstance(name, str) or not FIELD_NAME.match(name):
                raise SchemaViolation(f"{where}: field name {str(name)[:70]!r} is not a plain identifier")
            check_field_names(value, f"{where}.{name}", depth + 1)
    elif isinstance(doc, (list, tuple)):
        for item in doc:
            check_field_names(item, where, depth + 1)
