"""The incident feedback page an operator reaches from a notification or the dashboards' incident table: in a real
headless browser against the real API, the "False positive" button stores the verdict and publishes it."""
from __future__ import annotations

import os
import threading
import time

import pytest
import uvicorn
from selenium.webdriver.common.by import By

from config import load_config
from monitoring.records import sample_incident
from services import processes
from spark_jobs.api import create_app
from storage.mongo import Store
from telemetry.consumer import iter_messages
from telemetry.schema import decode_feedback

pytestmark = pytest.mark.e2e

TOKEN = "e2e-feedback-token"


@pytest.fixture
def api_url(cfg):
    """The API (uvicorn, real HTTP) on a free port for this test's configuration."""
    api_cfg = load_config(env={**os.environ, "FLEAD_API_TOKEN": TOKEN})
    port = processes.free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(api_cfg, run_round=lambda: {}), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not processes.port_open("127.0.0.1", port):
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_false_positive_button_stores_and_publishes_the_verdict(cfg, db, api_url, browser, artifacts_dir):
    incident = sample_incident(device_id="db-07", peak_ratio=4.2,
                               metrics_to_blame=[{"metric": "disk_io", "share": 0.8}, {"metric": "cpu", "share": 0.1}])
    db.collection("incidents").insert_one({**incident, "_id": incident["incident_id"]})

    browser.get(f"{api_url}/incidents/db-07:100/feedback")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "db-07: anomaly incident (open), peak 4.2x threshold; metrics to blame: disk_io (80%), cpu (10%)" in text
    assert browser.find_element(By.ID, "verdict").text == "none"
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "note").send_keys("nightly backup")
    browser.find_element(By.CSS_SELECTOR, "button[data-verdict=false_positive]").click()
    deadline = time.monotonic() + 20
    while browser.find_element(By.ID, "result").text != "saved":
        assert time.monotonic() < deadline, browser.find_element(By.ID, "result").text
        time.sleep(0.2)
    assert browser.find_element(By.ID, "verdict").text == "false_positive"
    browser.save_screenshot(str(artifacts_dir / "incident-feedback-page.png"))

    stored = db.collection("incident_feedback").find_one({"_id": "db-07:100"})
    assert stored["verdict"] == "false_positive" and stored["note"] == "nightly backup" and stored["published"]
    published = [decode_feedback(m.value()) for m in iter_messages(cfg.kafka_bootstrap, cfg.kafka.topics.feedback,
                                                                    from_beginning=True, timeout_s=3.0)]
    assert [(r["device_id"], r["verdict"]) for r in published] == [("db-07", "false_positive")]

    browser.execute_script("localStorage.clear()")
    browser.get(f"{api_url}/incidents/db-07:100/feedback")  # a wrong token is refused, and says so
    browser.find_element(By.ID, "token").send_keys("wrong")
    browser.find_element(By.CSS_SELECTOR, "button[data-verdict=confirmed]").click()
    deadline = time.monotonic() + 20
    while not browser.find_element(By.ID, "result").text.startswith("403"):
        assert time.monotonic() < deadline, browser.find_element(By.ID, "result").text
        time.sleep(0.2)
    assert db.collection("incident_feedback").find_one({"_id": "db-07:100"})["verdict"] == "false_positive"
