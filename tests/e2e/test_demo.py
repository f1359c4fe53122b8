"""The main command end to end: `flead demo` on a slice of ASD, then checks against MongoDB and the browser.

Every reading is scored, a federated round completes and its model is adopted by the stream job, the
summary's F1 equals one computed independently from MongoDB, and every dashboard renders.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pymongo
import pytest

from browser import DASHBOARDS, expected_charts, log_in, open_dashboard, screenshot
from config import PROJECT_ROOT, load_config
from services import processes
from visualization import superset_server

pytestmark = pytest.mark.e2e

DEVICES, TRAIN, TEST = 3, 600, 1000  # ASD's first anomalies come ~740 readings into the test part


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo on its own state dir and ports, leave it running for the checks, then `flead down`."""
    state = tmp_path_factory.mktemp("demo-state")
    env = {**os.environ, "FLEAD_STATE_DIR": str(state)}
    for key in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "MONGO_PORT", "SUPERSET_PORT", "API_PORT"):
        env[f"FLEAD_{key}"] = str(processes.free_port())
    env.pop("FLEAD_KAFKA_BOOTSTRAP", None), env.pop("FLEAD_MONGO_URI", None)
    summary_path = state / "summary.json"
    cfg = load_config(env=env)
    try:
        run = subprocess.run([sys.executable, "-m", "orchestration.cli", "demo", "--devices", str(DEVICES),
                              "--train-per-device", str(TRAIN), "--test-per-device", str(TEST), "--keep-running",
                              "--json", str(summary_path)], env=env, cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=1500)
        (PROJECT_ROOT / "artifacts").mkdir(exist_ok=True)
        (PROJECT_ROOT / "artifacts" / "demo-output.txt").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        yield cfg, json.loads(summary_path.read_text()), run.stdout
    finally:
        subprocess.run([sys.executable, "-m", "orchestration.cli", "down"], env=env, cwd=PROJECT_ROOT,
                       capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def demo_db(demo_run):
    cfg, _, _ = demo_run
    client = pymongo.MongoClient(cfg.mongo_uri)
    yield cfg, client[cfg.mongo.database]
    client.close()


def test_every_reading_is_scored_once(demo_run, demo_db):
    _, summary, stdout = demo_run
    cfg, db = demo_db
    total = DEVICES * (TRAIN + TEST)
    assert summary["readings"]["scored"] == total
    assert db[cfg.mongo.collections.predictions].count_documents({}) == total
    assert "FLEAD demo summary" in stdout


def test_a_federated_round_completed_and_was_adopted(demo_run, demo_db):
    _, summary, _ = demo_run
    cfg, db = demo_db
    assert summary["federated"]["rounds"] >= 1
    assert db[cfg.mongo.collections.global_models].count_documents({}) >= 1
    adopted = db[cfg.mongo.collections.predictions].count_documents({"global_version": {"$gte": 1}})
    assert adopted > 0 and summary["federated"]["adopted_version_in_scores"] >= 1


def test_summary_f1_equals_an_independent_computation(demo_run, demo_db):
    _, summary, _ = demo_run
    cfg, db = demo_db
    test_docs = list(db[cfg.mongo.collections.predictions].find(
        {"seq": {"$gte": TRAIN}}, {"label": 1, "is_anomaly": 1}))
    assert len(test_docs) == DEVICES * TEST
    y = np.array([d["label"] for d in test_docs])
    p = np.array([d["is_anomaly"] for d in test_docs])
    tp, fp, fn = np.sum(p & (y == 1)), np.sum(p & (y == 0)), np.sum(~p & (y == 1))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert summary["test_accuracy"]["f1"] == pytest.approx(f1)


def test_dashboards_render_the_demo_results(demo_run, browser):
    cfg, _, _ = demo_run
    base = superset_server.base_url(cfg)
    log_in(browser, base, superset_server.credentials(cfg))
    for dashboard in DASHBOARDS:
        states = open_dashboard(browser, base, dashboard["slug"], expected_charts(dashboard))
        screenshot(browser, PROJECT_ROOT / "artifacts" / f"demo-{dashboard['slug']}.png")
        assert not {s["name"]: s["error"] for s in states if s["error"]}
