"""The pure rules of the operator integrations: incident checks, notification payloads, back-off, suppression,
bounded metric labels, dead-letter reason classes and the health assessment."""
import doctest
import importlib
import json
import re
import time

import pytest
from hypothesis import given, settings, strategies as st

from monitoring.health import assess
from monitoring.metrics import OTHER, reason_class, select_devices
from monitoring.notifications import (NotificationSettings, alert_labels, alertmanager_alert, backoff_delay_s,
                                      delivery_id, drilldown_link, rfc3339, rison_string, signature, webhook_body)
from monitoring.records import encode_feedback, feedback_record, sample_incident
from monitoring.suppression import check_rule, matching_rule, rule_matches
from telemetry.schema import InvalidMessage, check_incident, decode_feedback, decode_incident

SETTINGS = NotificationSettings("http://superset:8088", "http://api:8000", critical_ratio=3.0, resend_interval_s=60)


@pytest.mark.parametrize("name", ["records", "notifications", "suppression", "metrics", "lag",
                                  "health"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(f"monitoring.{name}"))
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("change, reason", [
    ({"schema": "flead.incident/2"}, "schema"),
    ({"status": "closed"}, "status"),
    ({"incident_id": "other:100"}, "incident_id"),
    ({"device_id": ""}, "device_id"),
    ({"start_ts": "yesterday"}, "start_ts"),
    ({"start_ts": 2**70}, "start_ts"),
    ({"n_flagged": True}, "n_flagged"),
    ({"peak_score": float("nan")}, "peak_score"),
    ({"metrics_to_blame": [{"metric": "cpu", "share": 2.0}]}, "share"),
    ({"metrics_to_blame": [{"metric": "", "share": 0.5}]}, "metrics_to_blame[0]"),
    ({"metrics_to_blame": "cpu"}, "metrics_to_blame"),
    ({"stuck_metrics": "cpu"}, "stuck_metrics"),
    ({"stuck_metrics": [{"metric": "cpu", "repeats": 0, "usual": 3}]}, "stuck_metrics[0]"),
    ({"stuck_metrics": [{"metric": "cpu", "repeats": 9, "usual": -1}]}, "stuck_metrics[0]"),
    ({"stuck_metrics": [{"metric": "cpu", "repeats": 9.5, "usual": 3}]}, "stuck_metrics[0]"),
    ({"stuck_metrics": [{"metric": "cpu", "repeats": 9, "usual": 3}] * 101}, "at most 100"),
])
def test_a_bad_incident_is_refused_with_the_field_named(change, reason):
    with pytest.raises(InvalidMessage, match=re.escape(reason)):
        decode_incident(json.dumps(sample_incident(**change)))


def test_incidents_that_the_contract_allows_pass():
    assert check_incident(sample_incident(peak_ratio=None))["peak_ratio"] is None
    assert check_incident(sample_incident(status="resolved"))["status"] == "resolved"
    stuck = [{"metric": "cpu", "repeats": 40, "usual": 6}]
    assert check_incident(sample_incident(stuck_metrics=stuck))["stuck_metrics"] == stuck
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode_incident(b"{nope")


def test_feedback_record_round_trip_and_checks():
    record = feedback_record(sample_incident(), "false_positive", 1_000)
    assert decode_feedback(encode_feedback(record)) == record
    assert record["metrics_to_blame"] == sample_incident()["metrics_to_blame"] and record["peak_ratio"] == 2.5
    with pytest.raises(ValueError, match="verdict"):
        feedback_record(sample_incident(), "maybe", 1_000)
    with pytest.raises(InvalidMessage, match="verdict"):
        decode_feedback(json.dumps({**record, "verdict": "maybe"}))


def test_alertmanager_alert_open_and_resolved():
    now = 1_706_659_300_000
    opened = alertmanager_alert(sample_incident(), SETTINGS, now)
    assert opened["labels"] == {"alertname": "FleadIncident", "device": "dev-1", "incident_id": "dev-1:100",
                                "severity": "warning", "metrics_to_blame": "cpu,mem", "source": "flead"}
    assert opened["startsAt"] == rfc3339(1_706_659_200_000)
    assert opened["endsAt"] == rfc3339(now + 4 * 60_000)  # re-sent while open; stale after 4 missed re-sends
    assert "flead-device" in opened["generatorURL"] and "dev-1" in opened["generatorURL"]
    assert opened["annotations"]["feedback_url"] == "http://api:8000/incidents/dev-1%3A100/feedback"
    # a resolution keeps the first state's labels, even if the severity changed meanwhile
    resolved = sample_incident(status="resolved", peak_ratio=9.0, end_ts=1_706_659_280_000)
    closing = alertmanager_alert(resolved, SETTINGS, now, labels=opened["labels"])
    assert closing["labels"] == opened["labels"] and closing["endsAt"] == rfc3339(1_706_659_280_000)
    assert alert_labels(resolved, 3.0)["severity"] == "critical"
    # endsAt is never in the future for a resolution, never before the start
    assert alertmanager_alert(sample_incident(status="resolved", end_ts=now + 10**9), SETTINGS, now)["endsAt"] \
        == rfc3339(now)
    early = sample_incident(status="resolved", end_ts=0)
    assert alertmanager_alert(early, SETTINGS, now)["endsAt"] == rfc3339(early["start_ts"])


def test_webhook_body_carries_the_record_key_and_links():
    body = webhook_body(sample_incident(status="resolved"), SETTINGS, "key-1", 5)
    assert body["event"] == "incident_resolved" and body["idempotency_key"] == "key-1"
    assert body["incident"]["incident_id"] == "dev-1:100" and "schema" not in body["incident"]
    assert body["links"]["drilldown"].startswith("http://superset:8088/superset/dashboard/flead-device/")
    assert signature("s", b"x") == signature("s", b"x") != signature("t", b"x")


@given(st.text(min_size=1, max_size=50))
def test_rison_strings_escape_every_quote_and_bang(text):
    literal = rison_string(text)
    inner = literal[1:-1]
    assert literal[0] == literal[-1] == "'"
    unescaped = inner.replace("!!", "").replace("!'", "")
    assert "'" not in unescaped and "!" not in unescaped
    assert " " not in drilldown_link("http://h", text).split("?", 1)[1]  # the query is URL-encoded


@settings(max_examples=200)
@given(attempt=st.integers(1, 10_000), initial=st.floats(0.01, 10), factor=st.floats(1, 10),
       maximum=st.floats(0.01, 1000), jitter=st.floats(0, 1), u=st.floats(0, 0.999))
def test_backoff_is_bounded_and_never_negative(attempt, initial, factor, maximum, jitter, u):
    delay = backoff_delay_s(attempt, initial, factor, maximum, jitter, u)
    assert 0 <= delay <= maximum
    if jitter == 0 and attempt > 1:
        assert delay >= min(backoff_delay_s(attempt - 1, initial, factor, maximum, 0, u), maximum)


def test_delivery_ids_separate_receivers_incidents_and_states():
    ids = {delivery_id(r, i, s) for r in ("a", "b") for i in ("d:1", "d:2") for s in ("open", "resolved")}
    assert len(ids) == 8


def test_suppression_rules():
    incident = sample_incident()  # dev-1, cpu and mem to blame, started at 1_706_659_200_000
    start = incident["start_ts"]
    assert rule_matches({"device_id": "dev-1"}, incident)
    assert rule_matches({"metric": "mem"}, incident)
    assert not rule_matches({"metric": "disk"}, incident)
    assert not rule_matches({"device_id": "dev-1", "metric": "disk"}, incident)
    assert rule_matches({"device_id": "dev-1", "starts_at": start, "ends_at": start + 1}, incident)
    assert not rule_matches({"device_id": "dev-1", "starts_at": start + 1}, incident)
    assert not rule_matches({"device_id": "dev-1", "ends_at": start}, incident)
    assert matching_rule(incident, [{"_id": 1, "device_id": "x"}, {"_id": 2, "metric": "cpu"}])["_id"] == 2
    with pytest.raises(ValueError, match="every incident"):
        check_rule({"device_id": None, "metric": None, "starts_at": 5, "ends_at": None})
    with pytest.raises(ValueError, match="after starts_at"):
        check_rule({"device_id": "d", "starts_at": 5, "ends_at": 5})
    check_rule({"device_id": None, "metric": None, "starts_at": 5, "ends_at": 6})  # a fleet-wide window: fine


@given(st.dictionaries(st.text(min_size=1, max_size=5), st.tuples(st.integers(0, 100), st.integers(0, 100)),
                       max_size=30),
       st.integers(0, 10), st.lists(st.text(min_size=1, max_size=5), max_size=3))
def test_device_selection_is_bounded_and_keeps_the_allow_list(totals, top_n, allow):
    chosen = select_devices(totals, top_n, allow)
    assert chosen[:len(allow)] == allow
    assert len(chosen) <= len(allow) + top_n
    assert OTHER not in chosen or OTHER in allow or OTHER in totals
    rest = [d for d in totals if d not in chosen]
    if rest and top_n:  # nobody left out has more anomalies than the weakest device chosen by rank
        ranked = [d for d in chosen[len(allow):]]
        assert max(totals[d][1] for d in rest) <= min(totals[d][1] for d in ranked)


@pytest.mark.parametrize("reason, klass", [
    ("not JSON: Expecting value", "not_json"),
    ("missing field 'ts'", "missing_field"),
    ("schema: predictions.score: expected ['double'], got str", "unknown_schema"),
    ("metrics.m03: expected a number, got str", "wrong_type"),
    ("seq: -3 is out of range", "out_of_range"),
    ("metrics zz are not in the device's model (created with 38 metrics): ...", "unknown_metrics"),
    ("device_id 'a' under the Kafka key 'b'", "device_key_mismatch"),
    ("global model refused: non-finite weights", "global_model_refused"),
    ("delivery to webhook http://x failed after 15 attempts: HTTP 503", "delivery_failed"),
    ("incident: status: expected 'open' or 'resolved', got 'x'", "incident_invalid"),
    ("unsigned: no 'signature' field (devices sign telemetry with their token, ...)", "signature_refused"),
    ("scores: bad signature: the message was altered or signed with another key", "signature_refused"),
    ("snapshots: unsigned: no 'signature' field", "signature_refused"),
])
def test_dead_letter_reasons_fall_into_a_few_classes(reason, klass):
    assert reason_class(reason) == klass


def test_health_assessment():
    groups = {"flead-stream": "stream", "flead-mongo-sink": "sink"}
    healthy = assess({"kafka": True, "mongo": True}, {"stream": "up", "router": "not started"},
                     {"flead-stream": 100, "flead-mongo-sink": 0}, groups, max_lag=1000)
    assert healthy["ok"] and healthy["services"]["stream"]["lag"] == 100
    assert healthy["services"]["sink"]["keeping_pace"] is True  # runs elsewhere: seen through its group
    behind = assess({"kafka": True, "mongo": True}, {}, {"flead-mongo-sink": 5000}, groups, max_lag=1000)
    assert not behind["ok"] and "flead-mongo-sink: 5000 messages behind" in behind["problems"][0]
    died = assess({"kafka": True, "mongo": True}, {"sink": "down"}, {}, groups, max_lag=1000)
    assert not died["ok"] and died["problems"] == ["sink: down"]
    no_kafka = assess({"kafka": False, "mongo": True}, {}, None, groups, max_lag=1000)
    assert not no_kafka["ok"] and "kafka: down" in no_kafka["problems"]


def test_scrapes_never_wait_for_a_refresh_after_the_first():
    import threading

    from config import load_config
    from monitoring.metrics import PipelineCollector, Reading

    now = [0.0]
    release = threading.Event()
    reads = []

    class Counting(PipelineCollector):
        def read(self):
            reads.append(now[0])
            if len(reads) > 1:
                release.wait(10)  # a slow database
            return Reading(figure=len(reads))

    collector = Counting(load_config(env={"FLEAD_METRICS_CACHE_S": "10"}), db=lambda: None, clock=lambda: now[0])
    assert collector.reading()["figure"] == 1 and reads == [0.0]  # the first scrape reads
    now[0] = 5.0
    assert collector.reading()["figure"] == 1 and len(reads) == 1  # within metrics.cache_s: cached
    now[0] = 11.0
    assert collector.reading()["figure"] == 1  # stale: the previous reading at once, a refresh starts
    assert collector.reading()["figure"] == 1  # ... and only one
    release.set()
    deadline = time.monotonic() + 10
    while collector.reading()["figure"] != 2:
        assert time.monotonic() < deadline, reads
        time.sleep(0.01)
    assert len(reads) == 2 and "flead_metrics_read_timestamp_seconds" in {f.name for f in collector.collect()}


def test_feedback_record_of_an_incident_read_back_from_mongodb():
    from bson.int64 import Int64

    stored = sample_incident(start_ts=Int64(1_706_659_200_000), model_version=Int64(3), peak_score=Int64(12))
    record = feedback_record(stored, "confirmed", 5)
    assert type(record["start_ts"]) is int and type(record["peak_score"]) is int
    assert decode_feedback(encode_feedback(record))["start_ts"] == 1_706_659_200_000


@given(n_flagged=st.integers(1, 50), more=st.integers(0, 50), ratio=st.floats(0.0, 100.0),
       min_flagged=st.integers(1, 5))
def test_an_incident_worth_a_page_stays_worth_it_as_it_grows(n_flagged, more, ratio, min_flagged):
    """A page, once sent, is never one the rule would have held back later: both of its inputs only grow."""
    from monitoring.notifications import worth_notifying

    early = sample_incident(n_flagged=n_flagged, peak_ratio=ratio)
    later = sample_incident(n_flagged=n_flagged + more, peak_ratio=ratio * 1.5)
    if worth_notifying(early, min_flagged, 3.0):
        assert worth_notifying(later, min_flagged, 3.0)
    assert worth_notifying(early, min_flagged, 3.0) == (n_flagged >= min_flagged or ratio >= 3.0)


def test_the_router_refuses_a_minimum_of_no_flags_before_connecting_anywhere():
    from config import ConfigError, load_config
    from monitoring.router import IncidentRouter

    cfg = load_config(env={"FLEAD_ROUTER_NOTIFY_MIN_FLAGGED": "0", "FLEAD_MONGO_PORT": "1", "FLEAD_KAFKA_PORT": "1"})
    with pytest.raises(ConfigError, match="notify_min_flagged"):
        IncidentRouter(cfg)
