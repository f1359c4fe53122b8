"""The main command end to end: `flead demo` on a slice of ASD, then checks against MongoDB and the browser.

Every reading is scored and stored once, a federated round completes (no race with the scheduler) and its model is
adopted by the stream job, the summary's F1 and incident figures equal ones computed independently from the
bucketed documents, the malformed messages it sends become dead letters by reason, and after the summary the
dashboards stay up at the printed URL (until `flead down`) and render, with the fleet figures equal to MongoDB's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import requests

from browser import DASHBOARDS, chart, log_in, number, open_every_tab, screenshot
from config import PROJECT_ROOT, load_config
from models.metrics import event_counts, event_metrics
from services import listeners, processes
from visualization import superset_server

pytestmark = pytest.mark.e2e

# ASD's first anomalies come ~740 readings into the test part. The demo adds one drifting copy of a device (its test
# part noisier from reading 500 on): its model must have learned a while for the change to outlast what it absorbs
# (the drift monitor's window, 288 readings): with 2,000 training readings it declares a drift ~240 readings after.
DEVICES, TRAIN, TEST, DRIFTING = 3, 2000, 1000, 1


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo on its own state dir and ports (it leaves the dashboards up), check, then `flead down`."""
    state = tmp_path_factory.mktemp("demo-state")
    env = {**os.environ, "FLEAD_STATE_DIR": str(state)}
    for key in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "MONGO_PORT", "SUPERSET_PORT", "API_PORT"):
        env[f"FLEAD_{key}"] = str(processes.free_port())
    env.pop("FLEAD_KAFKA_BOOTSTRAP", None), env.pop("FLEAD_MONGO_URI", None)
    summary_path = state / "summary.json"
    cfg = load_config(env=env)
    try:
        run = subprocess.run([sys.executable, "-m", "orchestration.cli", "demo", "--devices", str(DEVICES),
                              "--train-per-device", str(TRAIN), "--test-per-device", str(TEST),
                              "--json", str(summary_path)], env=env, cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=1500)
        (PROJECT_ROOT / "artifacts").mkdir(exist_ok=True)
        (PROJECT_ROOT / "artifacts" / "demo-output.txt").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        yield cfg, json.loads(summary_path.read_text()), run.stdout, env
    finally:
        subprocess.run([sys.executable, "-m", "orchestration.cli", "down"], env=env, cwd=PROJECT_ROOT,
                       capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def demo_store(demo_run):
    from storage.mongo import Store

    cfg, *_ = demo_run
    with Store(cfg) as store:
        yield store


def test_every_reading_is_scored_and_stored_once(demo_run, demo_store):
    _, summary, stdout, _ = demo_run
    total = (DEVICES + DRIFTING) * (TRAIN + TEST)
    assert summary["readings"]["scored"] == total
    assert demo_store.count_readings("predictions") == total == demo_store.count_readings("device_data")
    assert demo_store.count_readings("fleet_rollups") == total  # the dashboards see every reading
    assert "FLEAD demo summary" in stdout


def test_a_federated_round_completed_without_a_race_and_was_adopted(demo_run, demo_store):
    _, summary, stdout, _ = demo_run
    assert summary["federated"]["rounds"] >= 1 and "written by another run meanwhile" not in stdout
    assert demo_store.collection("global_models").count_documents({}) >= 1
    adopted = int((demo_store.score_columns()["global_version"] >= 1).sum())
    assert adopted > 0 and summary["federated"]["adopted_version_in_scores"] >= 1


def test_summary_f1_equals_an_independent_computation(demo_run, demo_store):
    _, summary, *_ = demo_run
    cols = demo_store.score_columns()
    drifting = [copy["device_id"] for copy in summary["drift"]["copies"]]
    test = (cols["seq"] >= TRAIN) & ~np.isin(cols["device_id"], drifting)  # the copies carry no labels
    assert len(drifting) == DRIFTING and int(test.sum()) == DEVICES * TEST
    y, p = cols["label"][test] == 1, cols["is_anomaly"][test].astype(bool)
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert summary["test_accuracy"]["f1"] == pytest.approx(f1)
    # incident figures: each device's stored flags in seq order, grouped as the stream job groups them
    device = cols["device_id"][test]  # rows are grouped by device, each device's rows in seq order
    counts = [event_counts(y[device == d], p[device == d], demo_run[0].incidents.gap_readings)
              for d in sorted(set(device))]
    pooled = event_metrics({k: sum(c[k] for c in counts) for k in counts[0]})
    incidents = summary["incident_accuracy"]
    assert incidents["incident_f1"] == pytest.approx(pooled["incident_f1"])
    assert incidents["ranges"] == sum(c["ranges"] for c in counts) > 0
    assert incidents["stream_incident_ids"] == len(set(cols["incident_id"][test][p]) - {None})


def test_malformed_messages_become_dead_letters_by_reason(demo_run, demo_store):
    _, summary, *_ = demo_run
    sent = summary["bad_input"]["malformed_sent"]
    reasons = {d["reason"] for d in demo_store.find("dead_letters", {"source": demo_run[0].kafka.topics.telemetry})}
    assert sent >= 5 and demo_store.collection("dead_letters").count_documents({}) >= sent
    assert len(reasons) >= 5, reasons  # one of each kind the demo sends


def test_the_drifting_copy_is_declared_drifted_stored_and_reported(demo_run, demo_store):
    """The demo's drifting copy (a device whose normal turns noisier for good halfway through its test part): the
    stream job declares a drift after the change, the sink stores it, and the summary says where."""
    _, summary, stdout, _ = demo_run
    (copy,) = summary["drift"]["copies"]
    stored = sorted(e["seq"] for e in demo_store.find("drift_events", {"device_id": copy["device_id"]}))
    assert copy["declared_at_seqs"] == stored and stored, stdout[-3000:]
    assert copy["changed_from_seq"] == TRAIN + TEST // 2 < stored[0] < TRAIN + TEST
    assert f"drift        {copy['device_id']} (a copy of {copy['source']}" in stdout


def test_the_dashboards_stay_up_after_the_summary_and_show_the_demo(demo_run, demo_store, browser):
    cfg, summary, stdout, _ = demo_run
    base = superset_server.base_url(cfg)
    assert "stay up until `flead down`" in stdout and summary["dashboard"].startswith(base)
    assert requests.get(base + "/health", timeout=10).text.strip() == "OK"
    log_in(browser, base, superset_server.credentials(cfg))
    for dashboard in DASHBOARDS:
        states = open_every_tab(browser, base, dashboard, demo_store.device_ids()[0])
        screenshot(browser, PROJECT_ROOT / "artifacts" / f"demo-{dashboard['slug']}.png")
        assert not {s["name"]: s["error"] for s in states if s["error"]}
        if dashboard["slug"] == "flead-fleet":
            assert number(chart(states, "Readings scored")["text"]) == demo_store.count_readings("predictions")
            assert number(chart(states, "Alerts total")["text"]) == demo_store.collection("alerts").count_documents({})
        if dashboard["slug"] == "flead-data-quality":  # the drifting copy's drift event
            assert summary["drift"]["copies"][0]["device_id"] in chart(states, "Drift events")["text"]


def test_nothing_the_demo_left_running_listens_outside_loopback(demo_run):
    """What `flead demo` leaves up (servers, Superset) listens on 127.0.0.1 only; the stream job's own check runs
    in tests/chaos/test_kills.py while it scores."""
    cfg, *_ = demo_run
    ours = listeners.listeners(listeners.state_dir_processes(cfg.state_dir))
    assert {item.service for item in ours} >= {"kafka", "mongo"}, ours
    assert [str(item) for item in ours if not item.loopback_only] == []


def test_a_second_demo_deletes_what_the_first_left_and_scores_everything_again(demo_run):
    """`flead demo` twice on one state directory (the first left its data and dashboards): the second deletes what
    the first left, which it recorded (else the stream job would drop every replayed reading as already seen, and
    the demo would wait for scores until its timeout), then scores and stores each of its own readings once. Runs
    last: it replaces the data the tests above check."""
    from storage.mongo import Store

    cfg, _, _, env = demo_run
    devices, train, test = 2, 300, 200
    summary_path = cfg.state_dir / "summary-2.json"
    run = subprocess.run([sys.executable, "-m", "orchestration.cli", "demo", "--devices", str(devices),
                          "--train-per-device", str(train), "--test-per-device", str(test), "--no-superset",
                          "--keep-running", "--json", str(summary_path)], env=env, cwd=PROJECT_ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "left by the last demo, deleted" in run.stdout
    total = (devices + DRIFTING) * (train + test)
    assert json.loads(summary_path.read_text())["readings"]["scored"] == total
    with Store(cfg) as store:
        assert store.count_readings("predictions") == total
