"""Suppression rules: an operator mutes incidents of a device, of a metric, or both, within a time window.

A rule ``{"device_id", "metric", "starts_at", "ends_at"}`` (any of device and metric may be null = every one; the
window in epoch ms, ``ends_at`` null = open-ended) matches an incident when

- ``device_id`` is null or equals the incident's device,
- ``metric`` is null or is one of the incident's metrics to blame, and
- the incident started inside ``[starts_at, ends_at)`` (event time: the window says when the *anomaly* happened,
  so a maintenance window also mutes a replay of that period).

The router does not deliver a matching incident (delivery state ``suppressed``), and neither its resolution.

>>> rule = {"_id": "r1", "device_id": "dev-1", "metric": "cpu", "starts_at": 0, "ends_at": None}
>>> matching_rule(sample_incident(), [rule])["_id"]
'r1'
>>> matching_rule(sample_incident(device_id="dev-2"), [rule]) is None
True
"""
from __future__ import annotations

from typing import Iterable

from monitoring.records import sample_incident  # noqa: F401 (doctest)


def rule_matches(rule: dict, incident: dict) -> bool:
    """True when `rule` suppresses `incident` (see the module's docstring)."""
    if rule.get("device_id") is not None and rule["device_id"] != incident["device_id"]:
        return False
    if rule.get("metric") is not None and rule["metric"] not in {
            item["metric"] for item in incident.get("metrics_to_blame") or []}:
        return False
    started = incident["start_ts"]
    if rule.get("starts_at") is not None and started < rule["starts_at"]:
        return False
    return rule.get("ends_at") is None or started < rule["ends_at"]


def matching_rule(incident: dict, rules: Iterable[dict]) -> dict | None:
    """The first rule that suppresses `incident`, or None."""
    return next((rule for rule in rules if rule_matches(rule, incident)), None)


def check_rule(rule: dict) -> None:
    """`ValueError` naming the problem if `rule` could never match or matches everything forever."""
    if rule.get("device_id") is None and rule.get("metric") is None and rule.get("ends_at") is None:
        raise ValueError("a rule without device_id, metric and ends_at would mute every incident for ever; "
                         "name a device or a metric, or give the window an end")
    if rule.get("starts_at") is not None and rule.get("ends_at") is not None and rule["ends_at"] <= rule["starts_at"]:
        raise ValueError(f"ends_at ({rule['ends_at']}) must be after starts_at ({rule['starts_at']})")
