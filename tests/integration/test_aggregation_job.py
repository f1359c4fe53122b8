"""The aggregation job on real Spark (local[2], and a local standalone cluster) and the session's MongoDB and Kafka."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

from config import PROJECT_ROOT, load_config
from scoring.broadcasts import GlobalModels, global_model_of
from models.aggregation import fedavg, trimmed_mean
from models.integrity import global_model_verdict, sign_record, signing_key, verify_record, wire_form
from models.serialization import dumps, from_b64, loads, to_b64
from services import processes
from spark_jobs.aggregate_job import now_ms, read_round_window, run_round
from spark_jobs import standalone
from spark_jobs.session import spark_session, worker_environment
from storage.mongo import Store

pytestmark = [pytest.mark.integration, pytest.mark.spark]

# the configured model (dense autoencoder 16-4-16) of a device with 6 metrics
SHAPES = [(6, 16), (16,), (16, 4), (4,), (4, 16), (16,), (16, 6), (6,)]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"


@pytest.fixture(scope="module")
def spark():
    session = spark_session(load_config(), "flead-test-aggregate", master="local[2]")
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def configured_for_these_snapshots(monkeypatch):
    """These tests build dense-autoencoder snapshots (`SHAPES`, 6 metrics) and the aggregator checks snapshots
    against the configured model, so they configure that kind (the default is the subspace model). They store
    snapshots straight into MongoDB, so rounds read their window there (`aggregation.snapshot_source` mongodb; the
    default, kafka, reads the snapshots topic, which the stream job and the REST API write); the tests of the topic
    source set it themselves."""
    monkeypatch.setenv("FLEAD_MODEL_KIND", "ae")
    monkeypatch.setenv("FLEAD_AGGREGATION_SNAPSHOT_SOURCE", "mongodb")


def snapshot(device_id: str, weights, n_samples: int, version: int = 1, created_at: int | None = None,
             signed: bool = True) -> dict:
    """A `flead.snapshot/1` as the stream job sends it: signed with the deployment's key (the test's state dir)."""
    record = {"schema": "flead.snapshot/1", "device_id": device_id, "version": version, "global_version": 0,
              "n_samples": n_samples, "n_seen": n_samples * version, "loss": 0.01,
              "weights": to_b64(dumps(weights, {"architecture": "dense_ae", "model_version": version})),
              "created_at": created_at or int(time.time() * 1000) - 1000}
    return sign_record(record, signing_key(load_config())) if signed else record


def fleet(n_devices: int, seed: int = 0):
    """Honest devices near one model, then NaN, 100× scaled and sign-flipped ones; returns (snapshots, valid)."""
    rng = np.random.default_rng(seed)
    base = [rng.normal(size=s) for s in SHAPES]
    snaps, valid = [], []
    for i in range(n_devices):
        weights = [b + 0.05 * rng.normal(size=b.shape) for b in base]
        n = int(rng.integers(50, 500))
        kind = ("nan", "scaled", "flipped")[i % 3] if i % 20 == 0 else "honest"
        if kind == "nan":
            weights[1][0] = np.nan
        elif kind == "scaled":
            weights = [100 * w for w in weights]
        elif kind == "flipped":
            weights = [-w for w in weights]
        else:
            valid.append((weights, n))
        snaps.append((f"dev-{i:03d}", kind, snapshot(f"dev-{i:03d}", weights, n, version=2)))
    return snaps, valid


def read_global_messages(cfg, expected: int, timeout: float = 30.0) -> list[dict]:
    consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"test-aggregate-{time.time_ns()}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([cfg.kafka.topics.global_model])
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < expected and time.monotonic() < deadline:
        for msg in consumer.consume(10, timeout=1.0):
            assert msg.error() is None, msg.error()
            messages.append(json.loads(msg.value()))
    consumer.close()
    return messages


def test_spark_workers_import_the_installed_pyspark_not_the_zip_spark_puts_first(spark):
    """spark_jobs.worker_daemon: from the zip every worker daemon compiled PySpark again (~0.45 s a spark-submit)."""
    def pyspark_seen(_index: int) -> tuple[str, bool]:  # executor side (a local function: pickled by value)
        import sys

        import pyspark

        return pyspark.__file__, any(entry.endswith("pyspark.zip") for entry in sys.path)

    seen = spark.sparkContext.parallelize(range(2), 2).map(pyspark_seen).collect()
    assert all(on_path for _, on_path in seen)  # Spark put its zip there ...
    assert not any(".zip" in file for file, _ in seen)  # ... and the installed copy came first


def test_round_equals_numpy_fedavg_of_valid_updates_and_is_idempotent(spark, cfg, db):
    snaps, valid = fleet(200)
    stale = [snapshot(d, [np.full(s, 9.0) for s in SHAPES], 10, version=1) for d, _, _ in snaps[:5]]
    honest_id = snaps[1][0]
    forged = snapshot(honest_id, [np.full(s, 50.0) for s in SHAPES], 2 ** 53, version=10 ** 6, signed=False)
    forged["n_seen"] = 2 ** 53 + 10 ** 6
    db.write_local_models(stale + [s for _, _, s in snaps] + [forged])

    outcome = run_round(spark, cfg)

    assert outcome.status == "aggregated", outcome.message
    model = db.latest_global_model()
    assert model["version"] == 1 and model["round_id"] == "r1" and model["strategy"] == "fedavg"
    weights, _ = loads(from_b64(model["weights"]))
    for got, want in zip(weights, fedavg(valid)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    reasons: dict[str, str] = {}
    for r in model["rejected"]:   # a device whose newest snapshot fails falls back to an older one, also judged
        reasons[r["device_id"]] = reasons.get(r["device_id"], "") + r["reason"] + "; "
    for device, kind, _ in snaps:
        if kind == "honest":
            assert device in model["participants"]
        else:
            assert {"nan": "non-finite", "scaled": "exceeds", "flipped": "cosine"}[kind] in reasons[device]
    assert len(model["participants"]) == len(valid) == 190
    assert model["n_samples"] == sum(n for _, n in valid)
    assert reasons[honest_id].startswith("v1000000: unsigned") and honest_id in model["participants"]
    key = signing_key(cfg)
    assert verify_record(wire_form(model, "flead.global-model/1"), key) is None
    assert model["previous_version"] == 0 and global_model_verdict(wire_form(model, "flead.global-model/1"), key,
                                                                   0, None, cfg.integrity.max_version_gap).adopt
    history = db.aggregation_rounds()
    assert len(history) == 1 and history[0]["n_rejected"] == len(model["rejected"]) == 12
    assert history[0]["mean_loss"] == pytest.approx(0.01)
    assert history[0]["norms"]["max"] > 50 * history[0]["norms"]["median"]

    again = run_round(spark, cfg)
    assert again.status == "skipped" and "no new snapshots" in again.message
    assert db.collection("global_models").count_documents({}) == 1
    assert len(db.aggregation_rounds()) == 1

    messages = read_global_messages(cfg, expected=1)
    assert [m["version"] for m in messages] == [1]
    assert messages[0]["schema"] == "flead.global-model/1" and messages[0]["weights"] == model["weights"]
    assert verify_record(messages[0], key) is None


def test_a_window_read_ahead_is_the_rounds_input_and_cut_off(spark, cfg, db):
    """spark-submit reads the round's window on a thread while Spark starts (`read_round_window`, `run_job`'s
    ``ahead``): the round aggregates what that read saw (starting the workers while it waits), and a snapshot
    stored after the read belongs to the next round."""
    snaps, valid = fleet(40)
    db.write_local_models([s for _, _, s in snaps])
    pool = ThreadPoolExecutor(1)
    slow = pool.submit(lambda: (time.sleep(1.0), read_round_window(cfg))[1])   # not there when the round starts

    outcome = run_round(spark, cfg, publish_model=False, window=slow)

    assert outcome.status == "aggregated", outcome.message
    assert outcome.timings["read_ahead_s"] > 0 and outcome.timings["read_s"] >= 0.5
    model = db.latest_global_model()
    assert model["created_at"] == slow.result().started and len(model["participants"]) == len(valid)
    for got, want in zip(loads(from_b64(model["weights"]))[0], fedavg(valid)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    late = [snapshot(f"late-{i}", valid[i][0], 100, created_at=now_ms()) for i in range(2)]
    ahead = Future()
    ahead.set_result(read_round_window(cfg))
    time.sleep(0.01)
    db.write_local_models(late)   # stored after the read: not in the window it returned
    early = run_round(spark, cfg, publish_model=False, window=ahead)
    assert early.status == "skipped" and "no new snapshots" in early.message
    later = run_round(spark, cfg, publish_model=False)
    assert later.status == "aggregated" and sorted(db.latest_global_model()["participants"]) == ["late-0", "late-1"]
    pool.shutdown()


def test_dp_round_writes_counts_noised_model_and_epsilon_only(spark, cfg, db):
    snaps, valid = fleet(30, seed=8)
    db.write_local_models([s for _, _, s in snaps])
    private = load_config(env={**os.environ, "FLEAD_PRIVACY_ENABLED": "true"})

    outcome = run_round(spark, private, publish_model=False)

    assert outcome.status == "aggregated", outcome.message
    assert outcome.rejected == [] and outcome.n_rejected == 1 and "ε = " in outcome.message  # the NaN one
    model = db.latest_global_model()
    history = db.aggregation_rounds()[0]
    written = str(model) + str(history)
    assert not any(device in written for device, _, _ in snaps)
    assert model.get("participants", []) == [] and model["n_participants"] == 29 and model["dp_epsilon"] > 0
    assert verify_record(wire_form(model, "flead.global-model/1"), signing_key(cfg)) is None
    assert history["dp_epsilon"] == model["dp_epsilon"] and "norms" not in history and "mean_loss" not in history


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean"])
def test_robust_rounds_in_the_partitions_with_snapshots_fetched_by_the_executors(spark, cfg, db, strategy):
    """The median and the trimmed mean as reductions over the partitions (`models.partitioned`), each partition
    fetching its own snapshots by _id (`aggregation.snapshot_read: executors`): the exact coordinate-wise median
    (to the bit) and trimmed mean of the valid ones."""
    snaps, valid = fleet(60, seed=5)
    db.write_local_models([s for _, _, s in snaps])
    robust = load_config(env={**os.environ, "FLEAD_AGGREGATION_STRATEGY": strategy,
                              "FLEAD_AGGREGATION_SNAPSHOT_READ": "executors"})

    outcome = run_round(spark, robust, publish_model=False)

    assert outcome.status == "aggregated", outcome.message
    model = db.latest_global_model()
    assert model["strategy"] == strategy and model["n_participants"] == len(valid)
    weights, _ = loads(from_b64(model["weights"]))
    for k, got in enumerate(weights):
        stacked = np.stack([w[k] for w, _ in valid])
        if strategy == "median":
            np.testing.assert_array_equal(got, np.median(stacked, axis=0))
        else:
            np.testing.assert_allclose(got, trimmed_mean([([layer], 1) for layer in stacked],
                                                         robust.aggregation.trim_fraction)[0], rtol=1e-12)


def send_snapshots(cfg, values: list) -> None:
    """Records (or raw bytes) on the snapshots topic, as the stream job sends them (JSON, no key)."""
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for value in values:
        producer.produce(cfg.kafka.topics.snapshots, value if isinstance(value, bytes) else json.dumps(value).encode())
    assert producer.flush(30) == 0


def topic_source(read: str = "driver") -> object:
    return load_config(env={**os.environ, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "kafka",
                            "FLEAD_AGGREGATION_SNAPSHOT_READ": read})


@pytest.mark.parametrize("read", ["driver", "executors"])
def test_rounds_read_the_snapshots_topic_from_where_the_previous_round_ended(spark, cfg, db, read):
    """`aggregation.snapshot_source: kafka`: the round's offsets read from the topic, by the driver (split among
    the partitions) or by each partition (a redelivered snapshot counts once, messages that are no snapshot are
    counted), the history keeps where the round ended, and a snapshot sent after the round's read started goes to
    the next round, which starts there."""
    topic_cfg = topic_source(read)
    snaps, valid = fleet(60, seed=3)
    records = [s for _, _, s in snaps]
    send_snapshots(topic_cfg, records + records[:4] + [b"not json", b"[1, 2]"])
    db.write_local_models([snapshot("only-in-mongodb", valid[0][0], 100)])   # never sent: not in a topic round
    ahead = Future()
    ahead.set_result(read_round_window(topic_cfg))
    late = [snapshot(f"late-{i}", valid[i][0], 100, created_at=now_ms()) for i in range(2)]
    send_snapshots(topic_cfg, late)

    outcome = run_round(spark, topic_cfg, publish_model=False, window=ahead)

    assert outcome.status == "aggregated", outcome.message
    model = db.latest_global_model()
    assert sorted(model["participants"]) == sorted(d for d, kind, _ in snaps if kind == "honest")
    for got, want in zip(loads(from_b64(model["weights"]))[0], fedavg(valid)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    history = db.aggregation_round("r1")
    assert history["snapshot_offsets"] == {"topic": topic_cfg.kafka.topics.snapshots,
                                           "offsets": [{"partition": 0, "offset": 66}]}
    assert history["n_unreadable"] == 2 and model["n_rejected"] == 3   # nan, scaled, flipped: no duplicate reason

    later = run_round(spark, topic_cfg, publish_model=False)
    assert later.status == "aggregated", later.message
    assert sorted(db.latest_global_model()["participants"]) == ["late-0", "late-1"]
    assert db.aggregation_round("r2")["snapshot_offsets"]["offsets"] == [{"partition": 0, "offset": 68}]
    again = run_round(spark, topic_cfg, publish_model=False)
    assert again.status == "skipped" and "no new snapshots" in again.message


def test_a_topic_round_without_offsets_to_start_from_reads_mongodb_and_records_them(spark, cfg, db):
    """After a round that read MongoDB (no offsets in its history) a ``kafka`` round reads MongoDB too, recording
    the topic's ends it took first; the round after it reads the topic from there."""
    topic_cfg = topic_source()
    snaps, valid = fleet(30, seed=4)
    records = [s for _, _, s in snaps]
    db.write_local_models(records)   # as the sink stores what the stream job sends
    send_snapshots(topic_cfg, records)
    assert run_round(spark, cfg, publish_model=False).status == "aggregated"   # the mongodb source
    assert "snapshot_offsets" not in db.aggregation_round("r1")

    second = [snapshot(d, valid[i][0], 100, version=3, created_at=now_ms()) for i, d in enumerate(["a", "b"])]
    db.write_local_models(second)
    send_snapshots(topic_cfg, second)
    assert run_round(spark, topic_cfg, publish_model=False).status == "aggregated"
    assert sorted(db.latest_global_model()["participants"]) == ["a", "b"]
    assert db.aggregation_round("r2")["snapshot_offsets"]["offsets"] == [{"partition": 0, "offset": 32}]

    third = [snapshot(d, valid[i][0], 100, version=4, created_at=now_ms()) for i, d in enumerate(["c", "d"])]
    send_snapshots(topic_cfg, third)   # on the topic only: read from there
    assert run_round(spark, topic_cfg, publish_model=False).status == "aggregated"
    assert sorted(db.latest_global_model()["participants"]) == ["c", "d"]


def test_too_few_valid_updates_skip_the_round_with_reasons(spark, cfg, db):
    good = snapshot("good", [np.ones(s) for s in SHAPES], 10)
    bad = snapshot("bad", [np.ones(s) for s in SHAPES], 10, signed=False) | {"weights": "bm90IGEgYmxvYg=="}
    bad = sign_record(bad, signing_key(cfg))   # signed, but not a weight blob
    db.write_local_models([good, bad])

    outcome = run_round(spark, cfg, publish_model=False)

    assert outcome.status == "skipped"
    assert "needs at least 2" in outcome.message and "bad: v1: weights: " in outcome.message
    assert db.latest_global_model() is None


@pytest.mark.parametrize("members_bytes, ids", [
    (4_000_000, ["1:c0", "1:c1", "1:c2"]),
    (20, ["1:c0", "1:c0.1", "1:c1", "1:c1.1", "1:c2", "1:c2.1"]),  # two ids of 6 characters per record
])
def test_clustered_round_stores_one_model_per_cluster_under_the_round_version(spark, cfg, db, members_bytes, ids):
    rng = np.random.default_rng(1)
    centres = [[rng.normal(size=s) for s in SHAPES] for _ in range(3)]
    snaps = [snapshot(f"c{k}-{i}", [c + 0.01 * rng.normal(size=c.shape) for c in centres[k]], 100)
             for k in range(3) for i in range(4)]
    db.write_local_models(snaps)
    clustered = load_config(env={**os.environ, "FLEAD_AGGREGATION_STRATEGY": "clustered",
                                 "FLEAD_AGGREGATION_MIN_COSINE": "-1.0",
                                 "FLEAD_AGGREGATION_CLUSTER_MEMBERS_BYTES": str(members_bytes)})

    outcome = run_round(spark, clustered)

    assert outcome.status == "aggregated" and outcome.published, outcome.message
    assert outcome.message.endswith("; clusters of 4, 4, 4 device(s)")
    fleet_model = db.latest_global_model()
    assert fleet_model["_id"] == 1 and fleet_model.get("cluster") is None and fleet_model["cluster_sizes"] == [4, 4, 4]
    clusters = db.cluster_models(1)
    assert [c["_id"] for c in clusters] == ids
    # Published clusters first: a device that met the fleet model of a version first would adopt it and then skip
    # its cluster's model of that version. Each device's first model of version 1 is its cluster's.
    sent = read_global_messages(clustered, expected=len(ids) + 1)
    assert [m.get("cluster") for m in sent][-1] is None and len(sent) == len(ids) + 1
    arriving, first_adopted = GlobalModels(), {}
    for message in sent:
        arriving.offer(*global_model_of(message))
        for device in (s["device_id"] for s in snaps):
            newest = arriving.newest_for(device)
            if newest is not None and device not in first_adopted:
                first_adopted[device] = newest
    assert all(len(first_adopted[device].members) for device in first_adopted) and len(first_adopted) == 12
    for k in range(3):
        parts = [c for c in clusters if c["cluster"] == k]
        assert len({device.split("-")[0] for device in parts[0]["participants"]}) == 1  # one true group per cluster
        assert sorted(m for c in parts for m in c["members"]) == sorted(parts[0]["participants"])
    models = GlobalModels([global_model_of(m) for m in [fleet_model, *clusters]])  # as the stream job keeps them
    for c in clusters:
        assert all(models.newest_for(device).weights[0].tolist() == global_model_of(c)[1].weights[0].tolist()
                   for device in c["members"])  # each device adopts its own cluster's model
    assert models.newest_for("a-device-of-no-cluster") is models.by_cluster[global_model_of(fleet_model)[0]]


def test_second_round_via_spark_submit_checks_shapes_against_the_current_model(spark, cfg, db):
    snaps, _ = fleet(20, seed=3)
    db.write_local_models([s for _, _, s in snaps])
    assert run_round(spark, cfg, publish_model=False).status == "aggregated"
    time.sleep(0.01)
    later = int(time.time() * 1000)
    rng = np.random.default_rng(4)
    fresh = [snapshot(f"dev-{i:03d}", [rng.normal(size=s) * 0.01 + 1 for s in SHAPES], 100, 3, later)
             for i in range(6)]
    wrong_shape = snapshot("dev-wrong", [np.ones((7, 16))] + [np.ones(s) for s in SHAPES[1:]], 100, 3, later)
    tampered = snapshot("dev-tampered", [np.ones(s) for s in SHAPES], 100, 3, later, signed=False)
    tampered["weights"] = to_b64(from_b64(tampered["weights"])[:-8] + b"\x00" * 8)
    tampered = sign_record(tampered, signing_key(cfg))  # signed, but the blob inside is corrupt
    db.write_local_models(fresh + [wrong_shape, tampered])

    started = time.monotonic()
    result = subprocess.run([str(SPARK_SUBMIT), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                             str(PROJECT_ROOT / "spark_jobs" / "aggregate_job.py")],
                            env={**os.environ, **worker_environment()}, capture_output=True, text=True,
                            timeout=300, cwd=PROJECT_ROOT)
    print(f"spark-submit took {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"outcome"'))["outcome"]
    assert outcome["status"] == "aggregated" and outcome["version"] == 2, outcome
    model = db.latest_global_model()
    assert model["version"] == 2 and len(model["participants"]) == 6
    reasons = {r["device_id"]: r["reason"] for r in model["rejected"]}
    assert "wrong shape (7, 16)" in reasons["dev-wrong"]
    assert "SHA-256" in reasons["dev-tampered"]


def store_labelled_telemetry_and_aggregate(spark, cfg, db) -> None:
    """Three devices' 400 labelled readings (anomalies from seq 350, stored in two writes: two bucket documents
    each) and snapshots of detectors that learned the first 300; one round (global model v1)."""
    from models.detector import DeviceDetector

    rng = np.random.default_rng(5)
    metrics = ["cpu", "mem", "net"]
    readings, snaps = [], []
    for d in range(3):
        X = rng.normal(0.5, 0.05, size=(400, 3)) @ np.array([[1, 0.5, 0], [0, 1, 0.5], [0, 0, 1]])
        y = np.zeros(400, dtype=int)
        y[350::10] = 1
        X[y == 1, 2] += 1.0  # clear anomalies, all in the scored (held-out) part
        detector = DeviceDetector.create(metrics, cfg)
        detector.learn_many(X[:300], ts=1_700_000_000_000 + np.arange(300))  # the readings' event times below
        snaps.append(snapshot(f"dev-{d}", detector.get_weights(), 300) | {"version": 1})
        readings += [{"device_id": f"dev-{d}", "seq": i, "ts": 1_700_000_000_000 + i,
                      "metrics": dict(zip(metrics, map(float, X[i]))), "label": int(y[i])} for i in range(400)]
    db.write_readings([r for r in readings if r["seq"] < 200])
    db.write_readings([r for r in readings if r["seq"] >= 200])
    db.write_local_models(snaps)
    assert run_round(spark, cfg, publish_model=False).status == "aggregated"


def test_evaluation_scores_stored_telemetry_per_device_and_fleet(spark, cfg, db):
    from spark_jobs.evaluate_job import run_evaluation

    store_labelled_telemetry_and_aggregate(spark, cfg, db)
    outcome = run_evaluation(spark, cfg)

    assert outcome.status == "evaluated" and outcome.problems == [], outcome
    docs = {d["_id"]: d for d in db.collection("metrics").find()}
    assert set(docs) == {f"1:device:dev-{d}{s}" for d in range(3) for s in ("", ":local")} | {"1:fleet:fleet",
                                                                                             "1:fleet:fleet:local"}
    fleet = docs["1:fleet:fleet"]
    assert fleet["n_points"] == 3 * 280 and fleet["n_devices"] == 3 and fleet["model"] == "global"
    assert fleet["roc_auc"] > 0.9 and fleet["pr_auc"] > 0.5 and 0 <= fleet["f1"] <= 1
    assert docs["1:device:dev-0:local"]["local_version"] == 1
    assert run_evaluation(spark, cfg).n_documents == len(docs)  # a re-run overwrites
    assert db.collection("metrics").count_documents({}) == len(docs)


def test_evaluation_of_a_large_fleet_scores_a_sample_of_devices_on_their_newest_readings(spark, cfg, db):
    from spark_jobs.evaluate_job import run_evaluation, sample_devices

    store_labelled_telemetry_and_aggregate(spark, cfg, db)
    bounded = load_config(env={**os.environ, "FLEAD_AGGREGATION_EVALUATION_DEVICES": "2",
                               "FLEAD_AGGREGATION_EVALUATION_READINGS": "200"})

    outcome = run_evaluation(spark, bounded)

    assert (outcome.status, outcome.n_devices, outcome.n_devices_in_fleet) == ("evaluated", 2, 3), outcome
    assert "a sample of 3: aggregation.evaluation_devices" in outcome.message
    fleet = db.collection("metrics").find_one({"_id": "1:fleet:fleet"})
    assert (fleet["n_devices"], fleet["n_devices_in_fleet"]) == (2, 3)
    assert fleet["n_points"] == 2 * 140  # the newest 200 readings: 60 fit the scaler and threshold, 140 scored ...
    assert fleet["roc_auc"] > 0.9  # ... and hold the anomalies (seq 350 on): the oldest 200 have none
    scored = sorted(d["device_id"] for d in db.collection("metrics").find({"scope": "device", "model": "global"}))
    assert scored == sample_devices([f"dev-{d}" for d in range(3)], 2, version=1)
    assert run_evaluation(spark, bounded).to_dict() | {"duration_s": 0, "message": ""} == \
        outcome.to_dict() | {"duration_s": 0, "message": ""}  # a re-run for the version scores the same devices


def processes_in_session(session_ids: set[int]) -> list[int]:
    """Pids of live processes whose session is one of `session_ids` (the daemons and everything they forked)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in session_ids and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_spark_submit_runs_a_round_on_a_local_standalone_cluster(cfg, db):
    snaps, valid = fleet(40, seed=6)
    db.write_local_models([s for _, _, s in snaps])
    env = {**os.environ, **{f"FLEAD_AGGREGATION_{key.upper()}": str(processes.free_port()) for key in
                            ("spark_master_port", "spark_master_webui_port", "spark_worker_webui_port")}}
    cluster_cfg = load_config(env=env)
    flead = [sys.executable, "-m", "orchestration.cli", "spark-cluster"]

    started = time.monotonic()
    up = subprocess.run([*flead, "start"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        daemons = {processes.running_pid(cfg.state_dir, name) for name in (standalone.MASTER, standalone.WORKER)}
        assert None not in daemons
        result = subprocess.run([str(SPARK_SUBMIT), "--master", standalone.master_url(cluster_cfg),
                                 "--conf", "spark.ui.enabled=false",
                                 str(PROJECT_ROOT / "spark_jobs" / "aggregate_job.py")],
                                env={**env, **worker_environment()}, capture_output=True, text=True,
                                timeout=120, cwd=PROJECT_ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        deadline = time.monotonic() + 15  # the master marks the application finished once the driver has left
        while not (state := standalone.master_state(cluster_cfg) or {}).get("completedapps") \
                and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        down = subprocess.run([*flead, "stop"], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=60)
    print(f"standalone start + spark-submit + stop took {time.monotonic() - started:.1f} s")

    outcome = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"outcome"'))["outcome"]
    assert outcome["status"] == "aggregated" and outcome["version"] == 1, outcome
    model = db.latest_global_model()
    weights, _ = loads(from_b64(model["weights"]))
    for got, want in zip(weights, fedavg(valid)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert len(model["participants"]) == len(valid) == 38
    apps = state["completedapps"]
    assert [a["name"] for a in apps] == ["flead-aggregate"] and apps[0]["state"] == "FINISHED", apps
    assert state["activeapps"] == []

    assert down.returncode == 0 and "stopped spark-worker, spark-master" in down.stdout, down.stdout + down.stderr
    deadline = time.monotonic() + 10
    while (left := processes_in_session(daemons)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert left == [], f"left running: {left}"
    assert not processes.port_open(standalone.HOST, cluster_cfg.aggregation.spark_master_port)


def test_secure_round_announces_collects_recovers_a_dropout_and_unmasks_only_the_sum(spark, cfg, db):
    """Issue 17.4 with the devices simulated by the device-side functions the stream job calls: the aggregator
    announces a cohort, members answer with masked snapshots, one drops out, survivors reveal their seeds with it,
    and the round's model is FedAvg of the survivors; MongoDB holds masked words only."""
    from scipy.stats import chisquare

    from models.secure_aggregation import (answer_cohort, answer_dropouts, decode_words, enrolment_record,
                                           generate_key_pair)

    secure = load_config(env={**os.environ, "FLEAD_PRIVACY_SECURE_AGGREGATION": "true",
                              "FLEAD_PRIVACY_SECURE_ROUND_TIMEOUT_S": "0"})
    key = signing_key(secure)
    rng = np.random.default_rng(12)
    devices = {f"sec-{i}": generate_key_pair() for i in range(5)}
    models = {d: [rng.normal(size=s) for s in SHAPES] for d in devices}
    counts = {d: int(rng.integers(100, 2000)) for d in devices}
    now = int(time.time() * 1000) - 1000
    length = sum(int(np.prod(s)) for s in SHAPES)
    db.write_local_models([sign_record(enrolment_record(d, pub, length, SHAPES, 1, 10, now), key)
                                       for d, (_, pub) in devices.items()])

    announced = run_round(spark, secure)                       # 1. announce
    assert announced.status == "skipped" and "announced" in announced.message
    cohort = read_global_messages(cfg, expected=1)[0]
    assert cohort["schema"] == "flead.cohort/1" and verify_record(cohort, key) is None
    assert sorted(cohort["members"]) == sorted(devices)

    dropped = "sec-3"
    answers = [answer_cohort(cohort, d, devices[d][0], np.concatenate([w.ravel() for w in models[d]]), counts[d],
                             2, 10 + counts[d], now + 1) for d in devices if d != dropped]
    db.write_local_models([sign_record(a, key) for a in answers])
    waiting = run_round(spark, secure)                         # 2. a member is missing: ask for seeds
    assert waiting.status == "skipped" and "dropped out" in waiting.message
    recovery = read_global_messages(cfg, expected=2)[1]
    assert recovery["dropped"] == [dropped] and verify_record(recovery, key) is None
    reveals = [answer_dropouts(recovery, d, devices[d][0], now + 2, 3, 11 + counts[d]) for d in devices if d != dropped]
    db.write_local_models([sign_record(r, key) for r in reveals])

    outcome = run_round(spark, secure)                         # 3. unmask the survivors' sum
    assert outcome.status == "aggregated" and outcome.n_participants == 4, outcome.message
    model = db.latest_global_model()
    weights, _ = loads(from_b64(model["weights"]))
    survivors = [d for d in devices if d != dropped]
    expected = fedavg([(models[d], min(counts[d], secure.privacy.secure_max_weight)) for d in survivors])
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert model["strategy"] == "secure-fedavg"
    assert global_model_verdict(wire_form(model, "flead.global-model/1"), key, 0, None, 10).adopt

    stored = list(db.collection("local_models").find({"encoding": "masked-u64/1"}))
    assert len(stored) == 4
    for doc in stored:   # what MongoDB holds of an update: words indistinguishable from uniform
        words = decode_words(doc["weights"], length + 1)
        assert chisquare(np.bincount(words.view(np.uint8), minlength=256)).pvalue > 1e-4
