"""Incidents of the real stream job, end to end: PyFlink scores telemetry and emits `flead.incident/1` records, the
router delivers them to a real Alertmanager and a webhook (each state once), and an operator's false-positive verdict
(through the API, signed, on the feedback topic) stops the same pattern alerting on that device while another
anomaly still alerts.

One unbounded job (parallelism 1), and the router with its receivers, serve the module; the tests use their own
devices. The telemetry is synthetic: 4 metrics following one shared load curve plus noise, so the device's model
learns how they move together and a spike of one metric is blamed on that metric. At the default false-alarm rate (1 %) the noise alone opens a few
short incidents too: the delivery test checks every incident the job emitted, the feedback test only the readings
it spiked.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from config import PROJECT_ROOT, Config, load_config
from isolation import fresh_config
from http_receivers import FAST_RETRIES, Alertmanager, RecordingReceiver, Running, wait_for
from models.integrity import sign_device_message, signing_key
from monitoring.notifications import worth_notifying
from monitoring.router import IncidentRouter
from services import processes
from spark_jobs.api import create_app
from storage.mongo import Store
from stream_support import JOB, read_topic
from telemetry.schema import Reading, encode_batch

pytestmark = [pytest.mark.integration, pytest.mark.flink]

METRICS = ("cpu", "mem", "disk", "net")
LOAD = np.array([0.3, 0.2, 0.1, 0.25])  # each metric's share of the shared load curve
PERIOD = 40  # readings per load cycle
NOISE = 0.01
SPIKE = 0.5  # added to one metric of one reading: 50 noise standard deviations
WARMUP = 94 * 16  # normal readings per device first: the quantile threshold then rests on 15 scores above it
MESSAGE = 16  # readings per Kafka message (= stream.micro_batch_size: each message is scored as it comes, without
# waiting for the micro-batch timer)
TAIL = 32  # normal readings after a spike's message: more than incidents.gap_readings, so its incident resolves
WINDOW = 5  # model.subspace.window: a spike raises the scores of the readings whose window holds it
TOKEN = "incidents-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = int(time.time() * 1000) - 3_600_000  # event time of seq 0: recent, so Alertmanager shows current alerts


@dataclass
class StreamJob:
    """The module's running job: its configuration, Flink reporter, and how many readings it was sent per device."""

    cfg: Config
    state_dir: object
    pid: int
    reporter_url: str
    hook: RecordingReceiver
    alertmanager: Alertmanager
    next_seq: dict[str, int] = field(default_factory=dict)

    def send(self, device: str, n: int = MESSAGE, spike: str | None = None, at: int = 0) -> int:
        """`n` readings of `device` from its next seq on, reading `at` of them with a `spike` on that metric; the
        seq of that reading."""
        assert n % MESSAGE == 0, "whole messages only"
        first = self.next_seq.get(device, 0)
        seqs = np.arange(first, first + n)
        X = 0.5 + np.outer(np.sin(2 * np.pi * seqs / PERIOD), LOAD)
        X += np.random.default_rng([first, len(device)]).normal(0, NOISE, X.shape)
        if spike is not None:
            X[at, METRICS.index(spike)] += SPIKE
        producer, key = Producer({"bootstrap.servers": self.cfg.kafka_bootstrap, "linger.ms": 5}), signing_key(self.cfg)
        for start in range(0, n, MESSAGE):
            readings = [Reading(device, int(seqs[i]), T0 + int(seqs[i]) * 1000, dict(zip(METRICS, X[i].tolist())))
                        for i in range(start, min(start + MESSAGE, n))]
            producer.produce(self.cfg.kafka.topics.telemetry, key=device.encode(),
                             value=sign_device_message(encode_batch(device, readings), key, device))
        assert producer.flush(10) == 0
        self.next_seq[device] = first + n
        return first + at

    def counters(self) -> dict[str, float]:
        """The scorer's counters from Flink's Prometheus reporter (summed over subtasks)."""
        prefix = "flink_taskmanager_job_task_operator_"
        try:
            text = httpx.get(self.reporter_url, timeout=5).text
        except httpx.HTTPError:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(prefix):
                    name = sample.name[len(prefix):]
                    out[name] = out.get(name, 0.0) + sample.value
        return out

    def wait_scored(self, timeout_s: float = 120) -> dict[str, float]:
        """Wait until every reading sent so far was scored; the counters then."""
        sent = sum(self.next_seq.values())

        seen: dict[str, float] = {}

        def scored():
            assert processes.running_pid(self.state_dir, "stream") == self.pid, \
                processes.log_tail(self.state_dir, "stream", 60)
            seen.update(self.counters())
            return dict(seen) if seen.get("records_scored", 0) >= sent else None
        try:
            return wait_for(scored, timeout_s, f"the job scoring all {sent} readings sent", step_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the scorer's counters: {seen}") from None

    def incidents(self, device: str) -> list[dict]:
        """The device's incident records on the incidents topic, in order."""
        return [r for r in read_topic(self.cfg, "incidents", timeout_s=1.0) if r["device_id"] == device]


@pytest.fixture(scope="module")
def job(stack, tmp_path_factory):
    """The stream job on the module's own topics, warmed up with `WARMUP` normal readings of every test's device;
    the router delivers its incidents from the start to a real Alertmanager and a webhook (`hook`, which also
    records Alertmanager's notifications), so the warm-up's incidents are delivered while the job starts; the
    feedback test's device is suppressed there (a suppression rule)."""
    state_dir = tmp_path_factory.mktemp("stream")
    reporter_port = processes.free_port()
    settings = {"FLEAD_INTEGRITY_KEY": os.urandom(32).hex(),  # the API signs feedback with it, the job verifies
                "FLEAD_METRICS_FLINK_REPORTER_PORT": str(reporter_port)}
    with fresh_config(stack.cfg, **settings) as cfg, ExitStack() as cleanup:
        env = {**cfg.to_env(), "FLEAD_STATE_DIR": str(state_dir), "FLEAD_STREAM_PARALLELISM": "1"}
        pid = processes.start(state_dir, "stream", [sys.executable, str(JOB)], env=env, cwd=PROJECT_ROOT)
        cleanup.callback(processes.stop, state_dir, "stream", grace=10)
        hook = RecordingReceiver().start()
        cleanup.callback(hook.stop)
        alertmanager = Alertmanager(state_dir, hook.url)
        cleanup.callback(alertmanager.stop)
        with Store(cfg) as store:  # the feedback test's incidents are not delivered: half the router's work
            store.collection("suppressions").insert_one({"_id": "quiet", "device_id": "feedback-1", "metric": None,
                                                         "starts_at": None, "ends_at": None})
        rcfg = load_config(env={**os.environ, **FAST_RETRIES,
                                "FLEAD_ROUTER_ALERTMANAGER_URLS": json.dumps([alertmanager.url]),
                                "FLEAD_ROUTER_WEBHOOK_URLS": json.dumps([f"{hook.url}/hook"])})
        cleanup.enter_context(Running(IncidentRouter(rcfg)))  # receivers from router.*_urls
        running = StreamJob(cfg, state_dir, pid, f"http://127.0.0.1:{reporter_port}/metrics", hook, alertmanager)
        for device in ("route-1", "feedback-1"):
            running.send(device, WARMUP)
        running.wait_scored(timeout_s=300)
        yield running


def covering(incidents: list[dict], seq: int) -> list[dict]:
    """The incidents whose flagged readings include one of those a spike at `seq` raises."""
    return [i for i in incidents if i["start_seq"] <= seq + WINDOW - 1 and i["end_seq"] >= seq]


def latest_states(records: list[dict]) -> dict[str, dict]:
    """incident_id -> its latest record (a resolution, else the largest open state)."""
    out: dict[str, dict] = {}
    for r in records:
        held = out.get(r["incident_id"])
        if held is None or (r["status"], r["end_seq"]) >= (held["status"], held["end_seq"]):  # "resolved" > "open"
            out[r["incident_id"]] = r
    return out


def expected_deliveries(records: list[dict], cfg) -> list[tuple[str, str]]:
    """(incident_id, event) of every state of these incident records a webhook should get once: of the incidents
    worth a page (`router.notify_min_flagged` flags or a critical peak; both only grow, so the latest state says)."""
    states = {i: r for i, r in latest_states(records).items()
              if worth_notifying(r, cfg.router.notify_min_flagged, cfg.router.critical_ratio)}
    return sorted([(i, "incident_opened") for i in states]
                  + [(i, "incident_resolved") for i, r in states.items() if r["status"] == "resolved"])


def webhook_got(hook: RecordingReceiver, device: str) -> list[tuple[str, str]]:
    return sorted((b["incident"]["incident_id"], b["event"]) for b in hook.bodies("/hook")
                  if b["incident"]["device_id"] == device)


def replay_scores(job: StreamJob, device: str, replay: int) -> list[dict]:
    """The score records of the readings whose window holds the spike at `replay`."""
    return [r for r in read_topic(job.cfg, "scores", timeout_s=1.0)
            if r["device_id"] == device and replay <= r["seq"] < replay + WINDOW]


def replay_report(job: StreamJob, scored: list[dict], verdict_on: dict) -> str:
    """Why a replayed pattern was not muted (or not counted): the verdict's incident, the replay's score records,
    the scorer's counters as each subtask and attempt reported them, and the end of the job's log."""
    rows = [(r["seq"], round(r["score"] / r["threshold"], 2) if r.get("threshold") else None, r["is_anomaly"],
             r.get("incident_id"), [(m["metric"], round(m["share"], 2)) for m in r["top_metrics"]]) for r in scored]
    try:
        samples = [(s.name, s.labels.get("subtask_index"), s.labels.get("task_attempt_num"), s.value)
                   for family in text_string_to_metric_families(httpx.get(job.reporter_url, timeout=5).text)
                   for s in family.samples if s.name.endswith(("_anomalies_muted", "_records_scored"))]
    except httpx.HTTPError as exc:
        samples = [repr(exc)]
    return (f"verdict on {verdict_on['incident_id']}: peak_ratio {verdict_on['peak_ratio']:.2f}, blame "
            f"{verdict_on['metrics_to_blame']}; replay (seq, ratio, flagged, incident, top metrics): {rows}; "
            f"counter samples {samples}; job log:\n{processes.log_tail(job.state_dir, 'stream', 30)}")


def test_stream_incidents_reach_alertmanager_and_a_webhook_once_per_state(job):
    device = "route-1"
    hook, alertmanager = job.hook, job.alertmanager
    # the incident opens, and stays open (its last reading is in the gap)
    spike = job.send(device, spike="disk", at=MESSAGE - WINDOW + 1)
    job.wait_scored()
    [opened] = wait_for(lambda: covering(list(latest_states(job.incidents(device)).values()), spike), 30,
                        "the job emitting the incident")
    assert opened["status"] == "open" and opened["metrics_to_blame"][0]["metric"] == "disk"
    assert opened["peak_ratio"] > 3  # router.critical_ratio
    firing = wait_for(lambda: [n for n in hook.bodies("/alertmanager") if n["status"] == "firing"
                               and n["groupLabels"]["incident_id"] == opened["incident_id"]], 60,
                      "Alertmanager notified the incident firing")
    labels = firing[0]["alerts"][0]["labels"]
    assert labels["device"] == device and labels["severity"] == "critical"
    assert labels["metrics_to_blame"].split(",")[0] == "disk"

    job.send(device, TAIL)  # back to normal: the incident resolves
    job.wait_scored()
    wait_for(lambda: latest_states(job.incidents(device))[opened["incident_id"]]["status"] == "resolved", 30,
             "the job resolving the incident")
    wait_for(lambda: [n for n in hook.bodies("/alertmanager") if n["status"] == "resolved"
                      and n["groupLabels"]["incident_id"] == opened["incident_id"]], 30,
             "Alertmanager notified the resolution")
    expected = expected_deliveries(job.incidents(device), job.cfg)
    wait_for(lambda: len(webhook_got(hook, device)) >= len(expected), 30, "the webhook got every state")
    time.sleep(3)  # anything sent twice would arrive now (the router re-sends open incidents every 2 s)
    # every state the job emitted, each once (the noise's incidents too)
    assert webhook_got(hook, device) == expected_deliveries(job.incidents(device), job.cfg)
    mine = [n["status"] for n in hook.bodies("/alertmanager")
            if n["groupLabels"]["incident_id"] == opened["incident_id"]]
    assert mine == ["firing", "resolved"]
    assert not [a for a in alertmanager.alerts() if a["labels"]["incident_id"] == opened["incident_id"]]
    with Store(job.cfg) as store:
        delivered = {d["_id"]: d["state"] for d in store.collection("deliveries").find(
            {"incident_id": opened["incident_id"]})}
    assert sorted(delivered.values()) == ["delivered"] * 4, delivered  # 2 receivers x (open, resolved)


def test_a_false_positive_verdict_mutes_the_pattern_in_the_stream_and_another_anomaly_still_alerts(job):
    device = "feedback-1"
    first = job.send(device, spike="disk")
    job.send(device, TAIL)
    job.wait_scored()
    [incident] = wait_for(lambda: [i for i in latest_states(job.incidents(device)).values()
                                   if covering([i], first) and i["status"] == "resolved"], 30,
                          "the job emitting the incident and its resolution")
    assert incident["metrics_to_blame"][0]["metric"] == "disk"

    api_cfg = load_config(env={**os.environ, **job.cfg.to_env(), "FLEAD_API_TOKEN": TOKEN})
    with Store(job.cfg) as store:
        store.write_incidents([incident])  # as the sink stores it
    with TestClient(create_app(api_cfg, run_round=lambda: {})) as client:
        response = client.post(f"/api/incidents/{incident['incident_id']}/feedback", headers=AUTH,
                               json={"verdict": "false_positive", "note": "a backup job", "by": "test"})
        assert response.status_code == 201 and response.json()["published"], response.text

    def verdict_taken():  # the verdict reaches the worker on the broadcast side: scoring the device applies it
        job.send(device, MESSAGE)
        return job.wait_scored().get("feedback_applied", 0) >= 1
    wait_for(verdict_taken, 60, "the job applying the verdict", step_s=0)
    muted_before = job.counters()["anomalies_muted"]

    replay = job.send(device, spike="disk")  # the same pattern again
    job.send(device, TAIL)
    other = job.send(device, spike="cpu")  # another anomaly of the same device
    job.send(device, TAIL)
    job.wait_scored()

    [alerting] = wait_for(lambda: [i for i in latest_states(job.incidents(device)).values()
                                   if covering([i], other) and i["status"] == "resolved"], 30,
                          "the other anomaly's incident and its resolution")
    assert alerting["metrics_to_blame"][0]["metric"] == "cpu"
    scored = replay_scores(job, device, replay)
    # the detector still flags the replay (score above threshold), the verdict mutes it: nothing flagged, no incident
    assert len(scored) == WINDOW and any(r["score"] > r["threshold"] for r in scored), \
        replay_report(job, scored, incident)
    assert not any(r["is_anomaly"] for r in scored), replay_report(job, scored, incident)
    assert covering(list(latest_states(job.incidents(device)).values()), replay) == []
    muted = sum(r["score"] > r["threshold"] for r in scored)

    def counted():  # the scorer counts what it muted (a bundle reports its counters when it ends)
        return job.counters().get("anomalies_muted", 0) >= muted_before + muted
    try:
        wait_for(counted, 30, f"the scorer counting the {muted} muted readings", step_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {replay_report(job, scored, incident)}") from None
    with Store(job.cfg) as store:  # the suppression rule kept every state of the device's incidents from the receivers
        assert {d["state"] for d in store.collection("deliveries").find({"device_id": device})} == {"suppressed"}
    assert webhook_got(job.hook, device) == []
