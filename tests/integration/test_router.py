"""The incident router on the real broker and database, delivering to a real Alertmanager and a local webhook.

Incident records are produced by the tests (the `flead.incident/1` contract), replayed and duplicated as
at-least-once Kafka delivers them; each state must reach each receiver once, resolutions after openings, a
receiver that is down still gets everything afterwards, and a delivery that keeps failing becomes a dead letter.
"""
from __future__ import annotations

import json
import os
import time

import pytest
from confluent_kafka import Producer

from http_receivers import FAST_RETRIES, Alertmanager, RecordingReceiver, Running, router_cfg, wait_for
from models.integrity import sign_record, signing_key
from monitoring.deliveries import DeliveryStore
from monitoring.notifications import NotificationSettings
from monitoring.receivers import AlertmanagerReceiver, WebhookReceiver
from monitoring.records import sample_incident
from monitoring.router import IncidentRouter, retry_dead

pytestmark = pytest.mark.integration

def produce(cfg, *records: dict, signed: bool = True) -> None:
    """Incident records on the incidents topic, signed as the stream job signs them (raw bytes as they are)."""
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    key = signing_key(cfg)
    for record in records:
        value = record if isinstance(record, bytes) else json.dumps(
            sign_record(record, key) if signed else record).encode()
        producer.produce(cfg.kafka.topics.incidents, key=b"dev", value=value)
    assert producer.flush(10) == 0


def webhook_receiver(cfg, url: str) -> WebhookReceiver:
    return WebhookReceiver(url, NotificationSettings.from_config(cfg), cfg.router.timeout_s)


def test_alertmanager_and_webhook_get_each_state_once(cfg, db, tmp_path):
    hook = RecordingReceiver().start()  # the webhook receiver, and where Alertmanager sends its notifications
    alertmanager = Alertmanager(tmp_path, hook.url)
    try:
        rcfg = router_cfg()
        settings = NotificationSettings.from_config(rcfg)
        receivers = [AlertmanagerReceiver(alertmanager.url, settings, 5.0), webhook_receiver(rcfg, f"{hook.url}/hook")]
        opened = sample_incident(device_id="dev-am", start_ts=int(time.time() * 1000) - 60_000)
        grown = {**opened, "end_seq": opened["end_seq"] + 5, "n_flagged": 7, "peak_ratio": 9.0}  # now "critical"
        resolved = {**grown, "status": "resolved", "end_ts": int(time.time() * 1000) - 1_000}
        produce(rcfg, opened, opened, grown)  # a replayed record and an update of the open incident
        with Running(IncidentRouter(rcfg, receivers)):
            wait_for(lambda: hook.bodies("/hook"), 30, "the webhook got the opening")
            firing = wait_for(lambda: [n for n in hook.bodies("/alertmanager") if n["status"] == "firing"], 30,
                              "Alertmanager notified the firing alert")
            labels = firing[0]["alerts"][0]["labels"]
            assert labels["incident_id"] == opened["incident_id"] and labels["severity"] == "warning"
            assert labels["device"] == "dev-am" and labels["metrics_to_blame"] == "cpu,mem"
            assert firing[0]["alerts"][0]["generatorURL"].startswith(settings.drilldown_url)
            produce(rcfg, resolved, resolved, opened)  # the resolution twice, then a stale replay of the opening
            wait_for(lambda: [n for n in hook.bodies("/alertmanager") if n["status"] == "resolved"], 30,
                     "Alertmanager notified the resolution")
            time.sleep(3)  # anything sent twice would arrive now (group_interval is 1 s, re-sends every 2 s)

        hook_bodies = hook.bodies("/hook")
        assert [b["event"] for b in hook_bodies] == ["incident_opened", "incident_resolved"]
        keys = [r["headers"]["Idempotency-Key"] for r in hook.requests if r["path"] == "/hook"]
        assert keys == [b["idempotency_key"] for b in hook_bodies] and len(set(keys)) == 2
        assert hook_bodies[1]["incident"]["end_seq"] == grown["end_seq"]
        notifications = hook.bodies("/alertmanager")
        assert [n["status"] for n in notifications] == ["firing", "resolved"], notifications
        assert notifications[1]["alerts"][0]["labels"] == labels  # the same alert resolved, not a second one
        assert alertmanager.alerts() == []  # resolved: no longer listed as firing
        states = {d["_id"]: d["state"] for d in db.collection("deliveries").find()}
        assert sorted(states.values()) == ["delivered"] * 4
    finally:
        alertmanager.stop()
        hook.stop()


def test_a_receiver_down_for_30_s_gets_the_incident_afterwards(cfg, db):
    rcfg = router_cfg()
    hook = RecordingReceiver()  # port chosen, nothing listening yet
    receiver = webhook_receiver(rcfg, hook.url)
    produce(rcfg, sample_incident(device_id="dev-down"))
    with Running(IncidentRouter(rcfg, [receiver])):
        time.sleep(30)
        store = DeliveryStore(db, rcfg)
        down = store.get(f"{receiver.id}|dev-down:100|open")
        assert down["state"] == "pending" and down["attempts"] >= 10 and "ConnectionError" in down["last_error"]
        hook.start()
        try:
            wait_for(lambda: hook.bodies(), 10, "delivery after the receiver came back")
            time.sleep(2)
        finally:
            hook.stop()
    assert len(hook.bodies()) == 1 and hook.bodies()[0]["incident"]["device_id"] == "dev-down"
    assert store.get(f"{receiver.id}|dev-down:100|open")["state"] == "delivered"


def test_failing_deliveries_become_dead_letters_and_can_be_retried(cfg, db):
    rcfg = router_cfg(FLEAD_ROUTER_MAX_ATTEMPTS="3", FLEAD_ROUTER_BACKOFF_INITIAL_S="0.05")
    failing, refusing = RecordingReceiver(status=503).start(), RecordingReceiver(status=400).start()
    try:
        receivers = [webhook_receiver(rcfg, failing.url), webhook_receiver(rcfg, refusing.url)]
        tampered = {**sign_record(sample_incident(device_id="dev-forged"), signing_key(rcfg)), "peak_ratio": 99.0}
        produce(rcfg, sample_incident(device_id="dev-dead"), b"{not json",
                json.dumps(sample_incident(device_id="dev-x", status="closed")).encode(), json.dumps(tampered).encode())
        produce(rcfg, sample_incident(device_id="dev-forged"), signed=False)  # anyone could page on-call with it
        router = IncidentRouter(rcfg, receivers)
        stats = router.run(until_idle_s=1.0)
        assert stats["incidents"] == 1 and stats["incidents_invalid"] == 4 and stats["dead"] == 2
        assert len(failing.requests) == 3 and len(refusing.requests) == 1  # a refusal is not retried
        reasons = [d["reason"] for d in db.collection("dead_letters").find()]
        failed = f"delivery to webhook {failing.url} failed after 3 attempts: HTTP 503"
        assert any(r.startswith(failed) for r in reasons)
        assert f"delivery to webhook {refusing.url} was refused: HTTP 400" in reasons
        assert sum("incident: " in r for r in reasons) == 4  # the bad records, with their reasons
        assert sum("incident: unsigned" in r or "incident: bad signature" in r for r in reasons) == 2
        failing.status = 200
        assert retry_dead(rcfg) == 2
        IncidentRouter(rcfg, receivers).run(until_idle_s=1.0)
        assert len(failing.requests) == 4
    finally:
        failing.stop()
        refusing.stop()


def test_suppressed_incidents_are_not_delivered_nor_their_resolution(cfg, db):
    rcfg = router_cfg()
    db.collection("suppressions").insert_one({"_id": "r1", "device_id": "dev-mute", "metric": "cpu",
                                                           "starts_at": None, "ends_at": None})
    hook = RecordingReceiver().start()
    try:
        muted = sample_incident(device_id="dev-mute")
        other = sample_incident(device_id="dev-loud")
        produce(rcfg, muted, other, {**muted, "status": "resolved"})
        stats = IncidentRouter(rcfg, [webhook_receiver(rcfg, hook.url)]).run(until_idle_s=1.0)
        assert [b["incident"]["device_id"] for b in hook.bodies()] == ["dev-loud"]
        assert stats["suppressed"] == 2
        suppressed = db.collection("deliveries").find({"state": "suppressed"})
        assert {d["suppressed_by"] for d in suppressed} == {"r1"}
    finally:
        hook.stop()


def test_a_lone_flag_is_not_paged_until_a_second_confirms_it_and_a_critical_one_is_at_once(cfg, db):
    """router.notify_min_flagged (2): an incident of one flagged reading is what the threshold's false-alarm rate
    produces by design; it is sent once a later state of it has two, or at once if its peak is critical."""
    rcfg = router_cfg()
    hook = RecordingReceiver().start()
    try:
        lone = sample_incident(device_id="dev-lone", n_flagged=1, n_readings=1, peak_ratio=1.4)
        confirmed = sample_incident(device_id="dev-confirmed", n_flagged=1, n_readings=1, peak_ratio=1.2)
        critical = sample_incident(device_id="dev-critical", n_flagged=1, n_readings=1, peak_ratio=40.0)
        produce(rcfg, lone, confirmed, critical, {**lone, "status": "resolved"},
                {**confirmed, "n_flagged": 2, "n_readings": 3, "end_seq": confirmed["end_seq"] + 2},
                {**confirmed, "n_flagged": 2, "status": "resolved"})
        stats = IncidentRouter(rcfg, [webhook_receiver(rcfg, hook.url)]).run(until_idle_s=1.0)
        sent = [(b["incident"]["device_id"], b["incident"]["status"], b["incident"]["n_flagged"])
                for b in hook.bodies()]
        assert sorted(sent) == [("dev-confirmed", "open", 2), ("dev-confirmed", "resolved", 2),
                                ("dev-critical", "open", 1)]
        assert stats["held_back"] == 3  # the lone incident's two states, the confirmed one's first
        assert db.collection("deliveries").count_documents({"device_id": "dev-lone"}) == 0
    finally:
        hook.stop()


def test_a_router_that_died_before_sending_leaves_nothing_lost_or_doubled(cfg, db):
    rcfg = router_cfg()
    hook = RecordingReceiver().start()
    try:
        receivers = [webhook_receiver(rcfg, hook.url)]
        produce(rcfg, sample_incident(device_id="dev-crash"))
        first = IncidentRouter(rcfg, receivers)
        wait_for(lambda: first.poll_once() and first.stats["planned"], 20, "the record planned")
        first.close()  # dies after the outbox write and the commit, before sending
        assert hook.bodies() == []
        IncidentRouter(rcfg, receivers).run(until_idle_s=1.0)
        assert len(hook.bodies()) == 1
    finally:
        hook.stop()


def test_flead_router_start_and_stop(cfg, db):
    from orchestration.cli import main
    from services import processes

    hook = RecordingReceiver().start()
    env = {"FLEAD_ROUTER_WEBHOOK_URLS": json.dumps([hook.url]), **FAST_RETRIES}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["router", "start"]) == 0
        produce(cfg, sample_incident(device_id="dev-cli"))
        wait_for(lambda: hook.bodies(), 60, "the background router delivered")
    finally:
        assert main(["router", "stop"]) == 0
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        hook.stop()
    assert processes.running_pid(cfg.state_dir, "router") is None
