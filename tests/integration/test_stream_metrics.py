"""Metrics during a live stream run: the API's /metrics counters move while the PyFlink job scores and the sink
stores, the consumer lag of the stream job's group appears, and Flink's own Prometheus reporter answers on
127.0.0.1 only, with the scorer's counters."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from config import PROJECT_ROOT, load_config
from http_receivers import wait_for
from models.integrity import sign_device_message, signing_key
from services import processes
from spark_jobs.api import create_app
from storage.sink import MongoSink
from telemetry.schema import Reading, encode_batch

pytestmark = [pytest.mark.integration, pytest.mark.flink]

JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"
DEVICES = 3
MESSAGE = 16


def send_readings(cfg, start: int, n: int) -> None:
    """`n` readings per device from `start` on, in 16-reading messages keyed by device."""
    rng = np.random.default_rng(start)
    producer, key = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": 5}), signing_key(cfg)
    t0 = int(time.time() * 1000) - 3_600_000  # within stream.timestamp_window_s of now
    for device in (f"met-{i}" for i in range(DEVICES)):
        for first in range(start, start + n, MESSAGE):
            readings = [Reading(device, seq, t0 + seq * 1000,
                                {f"m{j}": float(v) for j, v in enumerate(rng.normal(0.5, 0.05, 4))})
                        for seq in range(first, min(first + MESSAGE, start + n))]
            producer.produce(cfg.kafka.topics.telemetry, key=device.encode(),
                             value=sign_device_message(encode_batch(device, readings), key, device))
    assert producer.flush(10) == 0


def scrape(client) -> dict[str, float]:
    """Sample name (with labels) -> value of one /metrics scrape."""
    text = client.get("/metrics").text
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def listening_addresses(port: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def test_metrics_move_during_a_stream_run_and_flink_reports_on_loopback(cfg, tmp_path):
    reporter_port = processes.free_port()
    env = {**cfg.to_env(), "FLEAD_STATE_DIR": str(tmp_path), "FLEAD_STREAM_PARALLELISM": "1",
           "FLEAD_INTEGRITY_KEY": signing_key(cfg).hex(),  # the key the devices and the sink hold
           "FLEAD_STREAM_CHECKPOINT_INTERVAL_MS": "1000", "FLEAD_METRICS_FLINK_REPORTER_PORT": str(reporter_port)}
    api_cfg = load_config(env={**os.environ, "FLEAD_METRICS_CACHE_S": "0", "FLEAD_API_TOKEN": "t"})
    send_readings(cfg, 0, 320)
    stop_sink = threading.Event()
    sink = threading.Thread(target=lambda: MongoSink(cfg).run(should_stop=stop_sink.is_set), daemon=True)
    pid = processes.start(tmp_path, "stream", [sys.executable, str(JOB)], env=env, cwd=PROJECT_ROOT)
    sink.start()
    try:
        with TestClient(create_app(api_cfg, run_round=lambda: {})) as client:
            def scored() -> float:
                assert processes.running_pid(tmp_path, "stream") == pid, processes.log_tail(tmp_path, "stream", 60)
                return scrape(client).get("flead_readings_scored_total[]", 0)

            first = wait_for(lambda: scored() >= DEVICES * 320 and scored(), 240, "the first readings stored")
            lags = wait_for(lambda: [k for k in scrape(client) if k.startswith("flead_consumer_lag")
                                     and "flead-stream" in k], 60, "the stream job's group in flead_consumer_lag")
            assert any(cfg.kafka.topics.telemetry in k for k in lags)

            flink_url = f"http://127.0.0.1:{reporter_port}/metrics"
            reporter = wait_for(lambda: _get(flink_url), 60, "Flink's reporter answering with the scorer's counters")
            assert all(address.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))
                       for address in listening_addresses(reporter_port)), listening_addresses(reporter_port)
            flink_before = _records_scored(reporter)

            send_readings(cfg, 320, 160)
            wait_for(lambda: scored() >= first + DEVICES * 160, 120, "the counters moving with the stream")
            per_device = scrape(client)
            assert per_device["flead_device_readings_scored_total[('device', 'met-0')]"] == 480
            assert "flead_device_score_max[('device', 'met-0')]" in per_device
            wait_for(lambda: _records_scored(_get(flink_url)) > flink_before, 60, "Flink's records_scored moving")
    finally:
        stop_sink.set()
        processes.stop(tmp_path, "stream", grace=10)
        sink.join(30)


def _get(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 and "records_scored" in response.text else None


def _records_scored(text: str | None) -> float:
    """The scorer's records_scored counter summed over subtasks, from Flink's reporter."""
    return sum(s.value for family in text_string_to_metric_families(text or "") for s in family.samples
               if s.name.endswith("_records_scored"))
