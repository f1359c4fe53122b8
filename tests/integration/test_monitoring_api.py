"""The API's operator routes on the session's Kafka and MongoDB: /metrics read from what the pipeline stored,
/healthz, incident feedback (stored and published for the stream job), suppression rules, the feedback page."""
from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from config import load_config
from http_receivers import wait_for
from models.integrity import sign_message, signing_key
from monitoring.notifications import worth_notifying
from monitoring.records import sample_incident
from monitoring.sources import PipelineReader
from telemetry.schema import decode_feedback
from spark_jobs.api import create_app
from storage.mongo import Store
from storage.sink import MongoSink
from telemetry.consumer import iter_messages
from telemetry.schema import encode_scores

pytestmark = pytest.mark.integration

TOKEN = "monitoring-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def api_cfg(**env):
    return load_config(env={**os.environ, "FLEAD_API_TOKEN": TOKEN, "FLEAD_METRICS_CACHE_S": "0", **env})


def samples(client) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics scrape, (name, sorted labels) -> value, from a reading taken after this call (the
    collector refreshes in the background: scrape until the reading shown is new enough)."""
    since = time.time()

    def scrape():
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
        return got if got[("flead_metrics_read_timestamp_seconds", ())] >= since else None
    return wait_for(scrape, 30, "a /metrics reading taken after the change", step_s=0.05)


def send_scores(cfg, device: str, seqs: range, anomalous=lambda seq: False) -> None:
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    scores = [{"seq": s, "ts": 1_700_000_000_000 + s * 1000, "score": 0.5 + (s % 7), "threshold": 4.0,
               "is_anomaly": anomalous(s), "top_metrics": [{"metric": "m0", "share": 1.0}], "label": 0}
              for s in seqs]
    producer.produce(cfg.kafka.topics.scores, key=device.encode(),
                     value=sign_message(encode_scores(device, 2, 1, 1_700_000_000_000, scores), signing_key(cfg)))
    assert producer.flush(10) == 0


def store_incident(db, cfg, **fields) -> dict:
    incident = sample_incident(**fields)
    db.collection("incidents").replace_one({"_id": incident["incident_id"]},
                                                       {**incident, "_id": incident["incident_id"]}, upsert=True)
    return incident


def test_metrics_follow_what_the_pipeline_stored(cfg, db):
    mcfg = api_cfg(FLEAD_METRICS_TOP_DEVICES="2", FLEAD_METRICS_DEVICE_ALLOW_LIST="quiet")
    for i, device in enumerate(["quiet", "a", "b", "c", "d"]):  # anomalies: 0, 3, 6, 9, 12
        send_scores(mcfg, device, range(0, 40), anomalous=lambda s, i=i: s < i * 3)
    MongoSink(mcfg).run(until_idle_s=2.0)  # the sink's group now has committed offsets on the scores topic
    db.write_dead_letters([{"reason": r, "raw": str(n), "source": "t", "device_id": None, "at": n}
                                        for n, r in enumerate(["missing field 'ts'", "missing field 'seq'",
                                                               "not JSON: x"])])
    store_incident(db, mcfg, device_id="d")
    store_incident(db, mcfg, device_id="c", status="resolved")
    store_incident(db, mcfg, device_id="b", status="resolved", n_flagged=1, n_readings=1, peak_ratio=1.2)  # lone
    store_incident(db, mcfg, device_id="a", status="resolved", n_flagged=1, n_readings=1, peak_ratio=3.5)  # critical
    db.collection("drift_events").insert_one({"_id": "d:9", "device_id": "d"})
    db.write_aggregation_round({"round_id": "r7", "version": 7, "strategy": "fedavg", "started_at": 5000,
                                             "n_participants": 4, "n_rejected": 1, "duration_s": 2.5})

    with TestClient(create_app(mcfg, run_round=lambda: {})) as client:
        before = samples(client)
        assert before[("flead_readings_scored_total", ())] == 200
        assert before[("flead_anomalies_total", ())] == 0 + 3 + 6 + 9 + 12
        per_device = {dict(k[1])["device"]: v for k, v in before.items() if k[0] == "flead_device_anomalies_total"}
        assert per_device == {"quiet": 0, "d": 12, "c": 9, "_other": 3 + 6}  # allow-list + top 2, the rest summed
        assert before[("flead_device_threshold", (("device", "d"),))] == 4.0
        assert before[("flead_dead_letters_total", (("reason_class", "missing_field"),))] == 2
        assert before[("flead_dead_letters_total", (("reason_class", "not_json"),))] == 1
        assert before[("flead_incidents_open", ())] == 1
        assert before[("flead_incidents_total", (("status", "resolved"),))] == 3
        assert before[("flead_incidents_never_paged_total", ())] == 1  # the lone one: below the critical ratio
        assert before[("flead_drift_events_total", ())] == 1
        assert before[("flead_last_round_version", ())] == 7 and before[("flead_last_round_rejections", ())] == 1
        assert before[("flead_last_round_duration_seconds", ())] == 2.5
        lag = {(dict(k[1])["group"], dict(k[1])["topic"]): v for k, v in before.items()
               if k[0] == "flead_consumer_lag"}
        assert lag[("flead-mongo-sink", mcfg.kafka.topics.scores)] == 0

        send_scores(mcfg, "b", range(40, 50), anomalous=lambda s: True)  # stored later: lag first, then counts
        after_send = samples(client)
        assert sum(v for k, v in after_send.items() if k[0] == "flead_consumer_lag"
                   and dict(k[1])["topic"] == mcfg.kafka.topics.scores) == 1  # one batch message behind
        MongoSink(mcfg).run(until_idle_s=2.0)
        after = samples(client)
        assert after[("flead_readings_scored_total", ())] == 210
        assert after[("flead_device_readings_scored_total", (("device", "b"),))] == 50  # b moved into the top 2
        assert after[("flead_metrics_read_seconds", ())] < 5


def test_feedback_is_stored_published_and_counted(cfg, db):
    fcfg = api_cfg()
    incident = store_incident(db, fcfg, device_id="dev-fb", peak_ratio=3.5)
    url = f"/api/incidents/{incident['incident_id']}/feedback"
    with TestClient(create_app(fcfg, run_round=lambda: {})) as client:
        assert client.post(url, json={"verdict": "false_positive"}).status_code == 401
        assert client.post(url, json={"verdict": "nope"}, headers=AUTH).status_code == 422
        assert client.post("/api/incidents/none:1/feedback", json={"verdict": "confirmed"},
                           headers=AUTH).status_code == 404
        assert client.get(url).status_code == 404
        answer = client.post(url, json={"verdict": "false_positive", "note": "backup job", "by": "ops"}, headers=AUTH)
        assert answer.status_code == 201 and answer.json()["published"] is True
        stored = client.get(url).json()
        assert stored["verdict"] == "false_positive" and stored["note"] == "backup job"
        assert stored["device_id"] == "dev-fb" and stored["peak_ratio"] == 3.5 and stored["published"] is True
        assert client.post(url, json={"verdict": "confirmed"}, headers=AUTH).status_code == 201
        assert [h["verdict"] for h in client.get(url).json()["history"]] == ["false_positive", "confirmed"]
        records = [decode_feedback(m.value()) for m in iter_messages(
            fcfg.kafka_bootstrap, fcfg.kafka.topics.feedback, from_beginning=True, timeout_s=3.0)]
        assert [r["verdict"] for r in records] == ["false_positive", "confirmed"]
        assert records[0]["metrics_to_blame"] == incident["metrics_to_blame"] and records[0]["peak_ratio"] == 3.5
        detail = client.get(f"/api/incidents/{incident['incident_id']}").json()
        assert detail["feedback"]["verdict"] == "confirmed" and "flead-device" in detail["links"]["drilldown"]

        store_incident(db, fcfg, device_id="dev-fb2")
        client.post("/api/incidents/dev-fb2:100/feedback", json={"verdict": "false_positive"}, headers=AUTH)
        metrics = samples(client)
        assert metrics[("flead_incident_feedback_total", (("verdict", "confirmed"),))] == 1
        assert metrics[("flead_incident_feedback_total", (("verdict", "false_positive"),))] == 1
        assert metrics[("flead_feedback_precision", ())] == 0.5
        assert [i["device_id"] for i in client.get("/api/incidents", params={"device_id": "dev-fb"}).json()] == \
            ["dev-fb"]


def test_feedback_page_escapes_what_came_from_kafka(cfg, db):
    fcfg = api_cfg()
    store_incident(db, fcfg, device_id="dev<script>x", incident_id="dev<script>x:100",
                   metrics_to_blame=[{"metric": "</b><img src=x>", "share": 1.0}])
    with TestClient(create_app(fcfg, run_round=lambda: {})) as client:
        page = client.get("/incidents/dev%3Cscript%3Ex:100/feedback")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "<script>x" not in page.text and "&lt;script&gt;x" in page.text and "<img" not in page.text
        assert "data-verdict=false_positive" in page.text
        assert client.get("/incidents/none:1/feedback").status_code == 404


def test_suppression_rules_are_added_listed_and_deleted(cfg, db):
    scfg = api_cfg()
    with TestClient(create_app(scfg, run_round=lambda: {})) as client:
        rule = {"device_id": "dev-1", "metric": "cpu", "starts_at": 1000, "ends_at": 2000, "reason": "maintenance"}
        assert client.post("/api/suppressions", json=rule).status_code == 401
        created = client.post("/api/suppressions", json=rule, headers=AUTH)
        assert created.status_code == 201
        rule_id = created.json()["id"]
        assert client.post("/api/suppressions", json={"reason": "everything"}, headers=AUTH).status_code == 400
        assert client.post("/api/suppressions", json={**rule, "ends_at": 500}, headers=AUTH).status_code == 400
        assert client.post("/api/suppressions", json={**rule, "colour": 1}, headers=AUTH).status_code == 422
        assert [r["id"] for r in client.get("/api/suppressions").json()] == [rule_id]
        assert samples(client)[("flead_suppression_rules", ())] == 1
        assert client.delete(f"/api/suppressions/{rule_id}", headers=AUTH).status_code == 204
        assert client.delete(f"/api/suppressions/{rule_id}", headers=AUTH).status_code == 404
        assert client.get("/api/suppressions").json() == []


def test_healthz_says_who_falls_behind(cfg, db):
    send_scores(cfg, "h", range(10))
    MongoSink(cfg).run(until_idle_s=2.0)
    for n in range(3):
        send_scores(cfg, "h", range(10 + n * 10, 20 + n * 10))
    with TestClient(create_app(api_cfg(), run_round=lambda: {})) as client:
        healthy = client.get("/healthz")
        assert healthy.status_code == 200 and healthy.json()["services"]["kafka"]["state"] == "up"
        assert healthy.json()["consumer_groups"]["flead-mongo-sink"]["lag"] == 3
    with TestClient(create_app(api_cfg(FLEAD_HEALTH_MAX_LAG_MESSAGES="2"), run_round=lambda: {})) as client:
        behind = client.get("/healthz")
        assert behind.status_code == 503
        assert behind.json()["problems"] == ["flead-mongo-sink: 3 messages behind (limit 2)"]
        assert behind.json()["services"]["sink"]["keeping_pace"] is False
        assert samples(client)[("flead_healthy", ())] == 0


def test_flead_health_command(cfg, capsys):
    from orchestration.cli import main

    assert main(["health"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "healthy" and any(line.split()[:2] == ["kafka", "up"] for line in lines)
    assert main(["health", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["services"]["mongo"]["state"] == "up"


def test_never_paged_count_is_the_routers_rule(cfg, db):
    """`incidents_never_paged` (a MongoDB filter) counts exactly the resolved incidents `worth_notifying` holds
    back, over a grid around both bounds: flagged readings below, at and above `router.notify_min_flagged`; the
    peak absent, null, below, at and above `router.critical_ratio`; open incidents never counted."""
    mcfg = api_cfg(FLEAD_ROUTER_NOTIFY_MIN_FLAGGED="3", FLEAD_ROUTER_CRITICAL_RATIO="2.5")
    router = mcfg.router
    db.collection("incidents").delete_many({})
    peaks = [None, 0.0, 1.0, router.critical_ratio - 1e-9, router.critical_ratio, router.critical_ratio + 0.5, "absent"]
    grid = []
    for status in ("open", "resolved"):
        for n_flagged in (1, router.notify_min_flagged - 1, router.notify_min_flagged, router.notify_min_flagged + 4):
            for peak in peaks:
                incident = sample_incident(device_id=f"sweep-{len(grid)}", status=status, n_flagged=n_flagged,
                                           n_readings=n_flagged + 2, peak_ratio=peak)
                if peak == "absent":
                    del incident["peak_ratio"]
                grid.append({**incident, "_id": incident["incident_id"]})
    db.collection("incidents").insert_many(grid)
    held_back = sum(1 for incident in grid if incident["status"] == "resolved"
                    and not worth_notifying(incident, router.notify_min_flagged, router.critical_ratio))
    assert held_back == 2 * 5  # 1 and min - 1 flagged; peak absent, null, 0, 1, just below the ratio
    assert PipelineReader(db, mcfg).incidents_never_paged() == held_back
