"""The platform against the real servers: Kafka round trip, every collection, schemas, idempotent replays,
and `flead up`/`flead down` as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, Producer

from config import load_config
from services import processes
from storage.mongo import Store
from storage.schemas import SchemaViolation

pytestmark = pytest.mark.integration


def test_ten_thousand_messages_come_back_in_order_per_device(cfg):
    topic = cfg.kafka.topics.telemetry
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": 5})
    devices = [f"dev-{i}" for i in range(20)]
    for seq in range(500):
        for device in devices:
            producer.produce(topic, key=device, value=json.dumps({"device_id": device, "seq": seq}))
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": "platform-test",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen: dict[str, list[int]] = defaultdict(list)
    deadline = time.monotonic() + 60
    while sum(map(len, seen.values())) < 10_000 and time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=1.0):
            assert msg.error() is None, msg.error()
            record = json.loads(msg.value())
            seen[record["device_id"]].append(record["seq"])
    consumer.close()
    assert sum(map(len, seen.values())) == 10_000
    assert all(seen[d] == list(range(500)) for d in devices)


def _score(device, seq, anomaly=False):
    return {"device_id": device, "seq": seq, "ts": 1_700_000_000_000 + seq * 1000, "score": 0.1 * seq,
            "threshold": 1.0, "is_anomaly": anomaly, "model_version": 1, "global_version": 0,
            "top_metrics": [{"metric": "m00", "share": 1.0}], "label": None, "scored_at": 1}


def test_every_collection_is_written_and_read(cfg, db):
    assert db.write_readings([{"device_id": "d", "seq": 0, "ts": 1, "metrics": {"a": 1.0}}]) == 1
    assert db.write_scores([_score("d", 0), _score("d", 1, anomaly=True)]) == (2, 1)
    snap = {"schema": "flead.snapshot/1", "device_id": "d", "version": 1, "global_version": 0, "n_samples": 10,
            "n_seen": 10, "loss": 0.1, "weights": "QUJD", "created_at": 5}
    assert db.write_local_models([snap, {**snap, "version": 2, "created_at": 6}]) == 2
    assert db.latest_local_models()[0]["version"] == 2
    model = {"version": 1, "strategy": "fedavg", "participants": ["d"], "weights": "QUJD", "created_at": 7}
    assert db.write_global_model(model) is True
    assert db.write_global_model(model) is False  # the same round again creates nothing
    assert db.latest_global_model()["version"] == 1
    db.write_aggregation_round({"round_id": "r1", "strategy": "fedavg", "started_at": 1,
                                "n_participants": 1, "n_rejected": 0})
    db.write_metrics([{"_id": "1:fleet:", "scope": "fleet", "model_version": 1, "created_at": 1}])
    db.write_dead_letters([{"reason": "not JSON", "raw": "{", "source": "t", "at": 1}])
    for key in ("device_data", "predictions", "alerts", "local_models", "global_models", "aggregation_history",
                "metrics", "dead_letters"):
        assert db.collection(key).count_documents({}) >= 1, key
    assert db.collection("alerts").find_one()["seq"] == 1


def test_a_document_that_violates_its_schema_is_refused(cfg, db):
    with pytest.raises(SchemaViolation, match=r"score record.score: expected"):
        db.write_scores([{**_score("d", 0), "score": "high"}])
    assert db.collection("predictions").count_documents({}) == 0


def test_replaying_the_same_records_never_duplicates(cfg, db):
    records = [_score(f"d{i % 10}", i, anomaly=i % 7 == 0) for i in range(1000)]
    for _ in range(2):
        db.write_scores(records)
    assert db.count_readings() == 1000
    assert db.collection("alerts").count_documents({}) == len([r for r in records if r["is_anomaly"]])


def test_a_read_of_documents_longer_than_one_reply_allows_is_read_again_in_smaller_replies(cfg, db):
    """The embedded FerretDB fills a reply with 101 documents whatever their size, and the driver refuses a reply
    over 48 MB: 101 snapshots of devices of 1,000 metrics (480 KB each) failed every aggregation round. Reads of
    such documents now come back whole, lazy ones too."""
    from spark_jobs.aggregate_job import now_ms, read_input

    mongodb_source = load_config(env={**os.environ, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "mongodb"})
    weights = "A" * 600_000
    snaps = [{"schema": "flead.snapshot/1", "device_id": f"d{i:03d}", "version": 1, "global_version": 0,
              "n_samples": 10, "n_seen": 10, "loss": 0.1, "weights": weights, "created_at": 5} for i in range(90)]
    for start in range(0, len(snaps), 10):  # 54 MB in all
        assert db.write_local_models(snaps[start:start + 10]) == 10
    assert len(db.latest_local_models()) == 90
    window = read_input(db, mongodb_source, now_ms())
    assert sorted(group[0]["device_id"] for group in window.groups) == [s["device_id"] for s in snaps]
    assert all(doc["weights"] == weights for doc in db.local_models_newest_first("d007"))


def _flead(env, *args):
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_up_twice_is_a_no_op_and_down_leaves_nothing(tmp_path):
    env = {**os.environ, "FLEAD_STATE_DIR": str(tmp_path / "state"),
           "FLEAD_KAFKA_PORT": str(processes.free_port()), "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port()),
           "FLEAD_MONGO_PORT": str(processes.free_port())}
    env.pop("FLEAD_KAFKA_BOOTSTRAP", None), env.pop("FLEAD_MONGO_URI", None)
    first = _flead(env, "up")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "started" in first.stdout
    pids = {p.stem: p.read_text() for p in (tmp_path / "state" / "run").glob("*.pid")}
    second = _flead(env, "up")
    assert second.returncode == 0 and "already running" in second.stdout and "started" not in second.stdout
    assert {p.stem: p.read_text() for p in (tmp_path / "state" / "run").glob("*.pid")} == pids
    assert _flead(env, "status").returncode == 0
    down = _flead(env, "down")
    assert down.returncode == 0 and "stopped kafka" in down.stdout
    for pid_text in pids.values():
        assert not os.path.exists(f"/proc/{pid_text.split()[0]}/cmdline") or \
            "Z" in open(f"/proc/{pid_text.split()[0]}/stat").read().rsplit(")", 1)[1].split()[0]
    assert _flead(env, "status").returncode == 1
