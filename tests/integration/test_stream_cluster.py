"""The stream job on a local standalone Flink cluster: `flead stream cluster-start`, `flink run -d -py ... -pyfs ...`
(`python -m flink_jobs.cluster submit`), scores arrive in Kafka, `flead stream cluster-stop`.

The cluster gets its own REST port, state directory and logs; the job reads the test's topics (the `cfg` fixture
exports them to the environment, which the submitting client reads).
"""
import os
import subprocess
import sys
import time

import pytest

from config import PROJECT_ROOT, load_config
from models.integrity import signing_key
from services import listeners, processes
from telemetry.consumer import iter_messages
from telemetry.producer import produce, producer_config
from telemetry.readers import open_reader
from telemetry.schema import decode_scores

pytestmark = [pytest.mark.integration, pytest.mark.flink]

DEADLINE_S = 120


def flead(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cluster_start_submit_score_stop(cfg, tmp_path):
    readings, counts = [], {}
    for r in open_reader("asd", cfg.data_dir / "asd/test.csv.gz"):  # the first 300 readings of 2 devices
        if r.device_id not in counts and len(counts) == 2:
            break
        counts[r.device_id] = counts.get(r.device_id, 0) + 1
        if counts[r.device_id] <= 300:
            readings.append(r)
    assert produce(readings, cfg.kafka.topics.telemetry, producer_config(cfg), key=signing_key(cfg),
                   batch=10).failed == 0

    env = {**os.environ, "FLEAD_STATE_DIR": str(tmp_path), "FLEAD_STREAM_REST_PORT": str(processes.free_port()),
           "FLEAD_INTEGRITY_KEY": signing_key(cfg).hex()}  # the key the readings were signed under
    job_cfg = load_config(env=env)
    started = flead("stream", "cluster-start", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        submitted = subprocess.run([sys.executable, "-m", "flink_jobs.cluster", "submit"], env=env, cwd=PROJECT_ROOT,
                                   capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
        assert "Job has been submitted" in submitted.stdout
        deadline = time.monotonic() + DEADLINE_S
        scores = []
        while time.monotonic() < deadline and len(scores) < len(readings):
            scores = [s for m in iter_messages(cfg.kafka_bootstrap, cfg.kafka.topics.scores, from_beginning=True,
                                               timeout_s=1.0) for s in decode_scores(m.value())]
        ids = {(s["device_id"], s["seq"]) for s in scores}
        assert ids == {(r.device_id, r.seq) for r in readings}, f"{len(ids)} of {len(readings)} scored"
        # the daemons (started with our conf dir) and their Python workers listen on 127.0.0.1 only
        cluster = listeners.listeners(listeners.processes_mentioning(str(tmp_path), "flink-cluster"))
        assert len(cluster) >= 2 and [str(item) for item in cluster if not item.loopback_only] == [], cluster
    finally:
        stopped = flead("stream", "cluster-stop", env=env)
        logs = job_cfg.state_dir / "logs" / "flink-cluster"
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not processes.port_open("127.0.0.1", job_cfg.stream.rest_port) or _closes(job_cfg.stream.rest_port), logs


def _closes(port: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not processes.port_open("127.0.0.1", port):
            return True
        time.sleep(0.5)
    return False
