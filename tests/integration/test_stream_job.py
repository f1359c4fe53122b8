"""The PyFlink stream job against the real broker: Kafka → Flink (local MiniCluster) → Kafka.

Each test runs `flink_jobs/anomaly_job.py` as a child process (bounded unless it is the failure test) and reads the
output topics back. Slices of ASD keep each test to about a minute on 2 cores.
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flink_jobs.checkpoints import (BACKEND_NOTE, checkpoint_number, completed_checkpoints, latest_restore_point,
                                    savepoint_dir)
from models.detector import DeviceDetector
from models.integrity import sign_device_message, signing_key, verify_message
from models.serialization import dumps, loads, from_b64, to_b64
from services import processes
from config import load_config
from stream_support import (JOB, JOB_TIMEOUT_S, asd_slice, global_model_message, read_topic, records, run_bounded,
                            send_raw)
from telemetry.consumer import iter_messages
from telemetry.producer import produce, producer_config
from telemetry.schema import Reading, encode_reading

pytestmark = [pytest.mark.integration, pytest.mark.flink]

READINGS_PER_DEVICE = 1500

def by_id(scores: list[dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for s in scores:
        out.setdefault((s["device_id"], s["seq"]), []).append(s)
    return out


def test_replay_scores_every_reading_once_dead_letters_bad_messages_and_learns(cfg, tmp_path):
    anomalous = asd_slice(cfg, "test", 3, READINGS_PER_DEVICE)
    normal = asd_slice(cfg, "train", 2, READINGS_PER_DEVICE, rename="train-")
    key = signing_key(cfg)
    # broken messages of device "bad", signed with its token (the one that is no JSON object cannot be)
    bad = [b"not json at all"] + [sign_device_message(m, key, "bad") for m in (
        b'{"schema": "flead.telemetry/1", "device_id": "omi-1", "seq": 1, "metrics": {"m00": 1}}',
        b'{"schema": "flead.telemetry/1", "device_id": "x", "seq": 1, "ts": 5, "metrics": {"m00": "high"}}',
        b'{"schema": "flead.telemetry/1", "device_id": "y", "seq": 1, "ts": 5, "metrics": {"m00": 1}}')]
    # a forged, unsigned reading far ahead: taken, it would make the device's later readings duplicates
    victim = anomalous[-1].device_id
    forged = encode_reading(Reading(victim, 10**12, anomalous[-1].ts, {"m00": 0.5}))
    # a device whose second message brings a metric its model was not created with: scored on the others
    grown = [Reading("grown-1", 0, 5, {"m00": 1.0}), Reading("grown-1", 1, 6, {"m00": 2.0, "zz": 3.0})]
    produce(anomalous[:2000], cfg.kafka.topics.telemetry, producer_config(cfg), key=key, batch=10)
    send_raw(cfg, "telemetry", bad)
    send_raw(cfg, "telemetry", [forged], key=victim.encode())
    send_raw(cfg, "telemetry", [sign_device_message(encode_reading(r), key, "grown-1") for r in grown],
             key=b"grown-1")
    result = produce(anomalous[2000:] + normal, cfg.kafka.topics.telemetry, producer_config(cfg), key=key,
                     batch=10)
    assert result.failed == 0

    started = time.monotonic()
    run_bounded(tmp_path)
    print(f"bounded job over {len(anomalous) + len(normal)} readings: {time.monotonic() - started:.1f} s")

    scores = by_id(read_topic(cfg, "scores"))
    expected = {(r.device_id, r.seq) for r in anomalous + normal + grown}
    assert set(scores) == expected
    assert all(len(copies) == 1 for copies in scores.values())  # a clean run: exactly one score per reading
    record = scores[(anomalous[-1].device_id, anomalous[-1].seq)][0]
    assert set(record) == {"device_id", "seq", "ts", "score", "threshold", "is_anomaly", "top_metrics",
                           "model_version", "global_version", "label", "scored_at", "p_value", "incident_id"}
    assert record["ts"] == anomalous[-1].ts and record["label"] == anomalous[-1].label
    assert {m["metric"] for m in record["top_metrics"]} <= set(anomalous[-1].metrics)

    dead = read_topic(cfg, "dead_letters")
    reasons = sorted(d["reason"] for d in dead)
    assert len(dead) == 6 and {d["source"] for d in dead} == {cfg.kafka.topics.telemetry}
    assert reasons[0] == "device_id 'y' under the Kafka key 'bad'"
    assert reasons[1] == ("metrics zz are not in the device's model (created with 1 metrics): their values are "
                          "ignored, the others scored")
    assert reasons[2] == "metrics.m00: expected a number, got str"
    assert reasons[3] == "missing field 'ts'"
    assert all(r.startswith("unsigned: no 'signature' field") for r in reasons[4:])  # "not json at all", forged
    assert {d["device_id"] for d in dead if d["reason"].startswith("unsigned")} == {"bad", victim}

    alerts = read_topic(cfg, "alerts")
    flagged = [copies[0] for copies in scores.values() if copies[0]["is_anomaly"]]
    assert len(alerts) == len(flagged) > 0
    signed = [m.value() for topic in ("scores", "alerts") for m in iter_messages(
        cfg.kafka_bootstrap, cfg.kafka.topics[topic], from_beginning=True, timeout_s=3.0)]
    assert signed and all(verify_message(value, key) is None for value in signed)  # what the sink will take

    for device in {r.device_id for r in normal}:
        ordered = [scores[(device, seq)][0]["score"] for seq in range(READINGS_PER_DEVICE)]
        late = np.median(ordered[-500:])
        # Scores are normalised residuals (each input divided by its typical residual on the device): once the
        # model has learned, a normal reading scores about 1, whatever the device's scale.
        assert 0.2 < late < 5.0, (device, late)

    snapshots = read_topic(cfg, "snapshots")
    for device in {r.device_id for r in anomalous + normal}:
        mine = [s for s in snapshots if s["device_id"] == device]
        assert [s["version"] for s in mine] == list(range(1, len(mine) + 1)) and len(mine) >= 2
        weights, _ = loads(from_b64(mine[-1]["weights"]))
        assert sum(s["n_samples"] for s in mine) == mine[-1]["n_seen"]


def test_global_models_are_adopted_by_version_and_cluster_and_poison_is_refused(cfg, tmp_path):
    readings = asd_slice(cfg, "test", 2, 600)
    names = list(readings[0].metrics)
    weights = DeviceDetector.create(names, cfg).get_weights()
    garbled = bytearray(dumps(weights, {"model_version": 9}))
    garbled[-5] ^= 0xFF
    poisoned = json.loads(global_model_message(weights, 9))
    poisoned["weights"] = to_b64(bytes(garbled))
    forged = json.loads(global_model_message(weights, 1000, key=bytes(32)))  # not the deployment's key
    send_raw(cfg, "global_model", [global_model_message(weights, 7),
                                   global_model_message(weights, 8, cluster=1, members=["omi-10"]),
                                   json.dumps(poisoned).encode(), json.dumps(forged).encode()])
    produce(readings, cfg.kafka.topics.telemetry, producer_config(cfg), key=signing_key(cfg), batch=10)

    run_bounded(tmp_path)

    scores = read_topic(cfg, "scores")
    assert len(scores) == len(readings)
    for device, version in (("omi-1", 7), ("omi-10", 8)):
        mine = sorted((s for s in scores if s["device_id"] == device), key=lambda s: s["seq"])
        versions = [s["global_version"] for s in mine]
        assert versions == sorted(versions) and versions[-1] == version, (device, set(versions))
    assert not {9, 1000} & {s["global_version"] for s in scores}
    dead = sorted(read_topic(cfg, "dead_letters"), key=lambda d: d["reason"])
    assert [d["reason"].split(":")[:2] for d in dead] == [["broadcast refused", " bad signature"],
                                                          ["broadcast refused", " bad signature"]]
    assert {d["source"] for d in dead} == {cfg.kafka.topics.global_model}


def read_to_end(cfg, key: str) -> list[dict]:
    """The topic's records up to its end offsets as of the call. (Reading until the topic is quiet for a while, as
    `read_topic` does, may not return while a live job keeps writing.)"""
    from confluent_kafka import Consumer, TopicPartition

    topic = cfg.kafka.topics[key]
    consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"test-{time.monotonic_ns()}",
                         "enable.auto.commit": False})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        pending = {p for p in partitions if ends[p] > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in pending])
        out, deadline = [], time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            if msg.offset() < ends[msg.partition()]:
                out.extend(records(key, msg.value()))
            if msg.offset() >= ends[msg.partition()] - 1:
                pending.discard(msg.partition())
        assert not pending, f"could not read {topic} to its end"
        return out
    finally:
        consumer.close()


def wait_for_scores(cfg, state_dir: Path, pid: int, enough) -> list[dict]:
    """Poll the scores topic until `enough(scores)`; fail with the job's log if it died."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        scores = read_to_end(cfg, "scores")
        if enough(scores):
            return scores
        assert processes.running_pid(state_dir, "stream") == pid, processes.log_tail(state_dir, "stream", 60)
        time.sleep(1)
    raise AssertionError(f"not enough scores after {JOB_TIMEOUT_S} s")


def newest_checkpoint_id(job_cfg) -> int:
    """The number N of the job's newest completed ``chk-N`` (0: none yet); by name only, as a running job deletes
    the older ones."""
    return max(map(checkpoint_number, completed_checkpoints(job_cfg)), default=0)


def kill_mid_stream_and_restart(cfg, tmp_path, settings: dict, stop_with_savepoint: bool = False,
                                restart_settings: dict | None = None) -> Path:
    """Kill -9 a live job (FLEAD_* `settings`) once every device's model has a version in a completed checkpoint,
    restart it from the newest retained checkpoint, and check that every reading is scored and the models continue.
    With `stop_with_savepoint` it is stopped as `flead stream stop` does instead (SIGTERM to the job's process alone:
    a savepoint), and restarted with `restart_settings` on top of `settings` (e.g. another state backend).

    The sinks are at-least-once, so readings after the checkpoint may be scored twice under the same
    (device_id, seq) — the MongoDB sink upserts by that id. We assert: the distinct (device_id, seq) set is
    complete, no id appears more than twice (after a savepoint: none scored before the stop), the restarted job
    scores each device with at least the model version it had reached before the kill (a state lost at the restart
    would start again from version 0), and reading counts continue. Returns the checkpoint or savepoint restored
    from.
    """
    # the devices' readings interleaved, as a fleet sends them: each device's model is snapshotted early
    readings = sorted(asd_slice(cfg, "test", 3, 1200), key=lambda r: (r.seq, r.device_id))
    devices = {r.device_id for r in readings}
    expected = {(r.device_id, r.seq) for r in readings}
    env = {"FLEAD_STATE_DIR": str(tmp_path), "FLEAD_STREAM_CHECKPOINT_INTERVAL_MS": "1000",
           "FLEAD_STREAM_SNAPSHOT_EVERY": "200", "FLEAD_INTEGRITY_KEY": signing_key(cfg).hex(),  # the devices' key
           **settings}
    job_cfg = load_config(env={**os.environ, **env})
    producer = threading.Thread(target=produce, args=(readings, cfg.kafka.topics.telemetry, producer_config(cfg)),
                                kwargs={"key": signing_key(cfg), "batch": 10, "rate": 100.0})
    pid = processes.start(tmp_path, "stream", [sys.executable, str(JOB)], env=env)

    def versions(scores: list[dict]) -> dict[str, int]:
        reached: dict[str, int] = {}
        for s in scores:
            reached[s["device_id"]] = max(reached.get(s["device_id"], 0), s["model_version"])
        return reached

    try:
        # produce only once the job runs (it checkpoints): a job started under load that then drains a backlog
        # faster than the producer's rate would finish before it could be killed mid-stream
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not newest_checkpoint_id(job_cfg):
            assert time.monotonic() < deadline, "no checkpoint: " + processes.log_tail(tmp_path, "stream", 60)
            assert processes.running_pid(tmp_path, "stream") == pid, processes.log_tail(tmp_path, "stream", 60)
            time.sleep(0.5)
        producer.start()
        # kill early (a job that lags under load catches up fast, and the producer's 36 s must not run out first),
        # but once each model has snapshotted (version >= 1) and a checkpoint begun after that completed
        reached = versions(wait_for_scores(cfg, tmp_path, pid, lambda scores: versions(scores).keys() == devices
                                           and min(versions(scores).values()) >= 1))
        after = newest_checkpoint_id(job_cfg) + 2  # the next one may have begun before those scores
        while newest_checkpoint_id(job_cfg) < after:
            assert time.monotonic() < deadline, "no checkpoint: " + processes.log_tail(tmp_path, "stream", 60)
            assert processes.running_pid(tmp_path, "stream") == pid, processes.log_tail(tmp_path, "stream", 60)
            time.sleep(0.2)
        killed_at = int(time.time() * 1000)
        if stop_with_savepoint:  # what `flead stream stop` does (its leader grace from the settings)
            from flink_jobs.cli import stream_service
            assert stream_service(job_cfg).stop()
        else:
            os.killpg(pid, signal.SIGKILL)
        assert len(read_to_end(cfg, "scores")) < len(readings) - 300, "the job finished before it could be killed"
    finally:
        processes.stop(tmp_path, "stream", grace=5)
        if producer.ident is not None:  # started
            producer.join()

    restored = latest_restore_point(job_cfg)
    assert restored is not None
    assert (restored.parent == savepoint_dir(job_cfg)) == stop_with_savepoint, (
        restored, processes.log_tail(tmp_path, "stream", 60))
    env = {**env, **(restart_settings or {})}
    pid = processes.start(tmp_path, "stream", [sys.executable, str(JOB), "--from-savepoint", "latest"], env=env)
    try:
        scores = wait_for_scores(cfg, tmp_path, pid, lambda scores: {(s["device_id"], s["seq"]) for s in scores}
                                 >= expected)
    finally:
        processes.stop(tmp_path, "stream", grace=5)

    copies = by_id(scores)
    twice = {key: sorted(s["scored_at"] - killed_at for s in c) for key, c in copies.items() if len(c) > 1}
    print(f"{len(scores)} score records, {len(copies)} distinct readings, {len(twice)} scored twice: {twice}")
    assert set(copies) == expected  # none missing
    assert max(len(c) for c in copies.values()) <= 2
    if stop_with_savepoint:  # nothing scored before the stop is scored again; a partial micro-batch that its flush
        # timer scores while the savepoint completes may be (its buffer is in the savepoint): seen in 1 of 5 runs
        assert all(first >= 0 for first, *_ in twice.values()), twice
        assert len(twice) < cfg.stream.micro_batch_size * len(devices), twice
    for device in devices:
        restarted = [s["model_version"] for s in scores if s["device_id"] == device and s["scored_at"] > killed_at]
        assert restarted, f"{device}: nothing scored after the restart"
        assert min(restarted) >= reached[device] >= 1, (device, reached[device], min(restarted))
    snapshots = read_topic(cfg, "snapshots")
    for device in devices:
        mine = [s for s in snapshots if s["device_id"] == device]
        assert max(s["n_seen"] for s in mine) >= 1200 - 200, device
        assert max(s["version"] for s in mine) >= 5, device
        assert max(c["model_version"] for c in copies[(device, 1199)]) >= 5, device
    return restored


def test_killed_job_restarts_from_its_checkpoint_without_losing_model_state(cfg, tmp_path):
    """Kill -9 mid-stream, restart from the newest retained checkpoint (the default state backend): every reading
    scored, models continue (`kill_mid_stream_and_restart`)."""
    kill_mid_stream_and_restart(cfg, tmp_path, {})


def test_a_job_on_rocksdb_restarts_from_its_incremental_checkpoint_with_every_model(cfg, tmp_path):
    """The same on the large-fleet setting, RocksDB with incremental checkpoints: the checkpoint restored from keeps
    the devices' state in the job's ``shared/`` files (each checkpoint uploads only the RocksDB files made since the
    one before and refers to the older ones; a full checkpoint writes its own), and every device's model continues."""
    restored = kill_mid_stream_and_restart(cfg, tmp_path, {"FLEAD_STREAM_STATE_BACKEND": "rocksdb",
                                                            "FLEAD_STREAM_INCREMENTAL_CHECKPOINTS": "true"})
    assert any((restored.parent / "shared").iterdir()), sorted(p.name for p in restored.parent.rglob("*"))
    assert any((tmp_path / "flink" / "rocksdb").iterdir())  # working files in the state directory, not in /tmp
    assert (restored.parent / BACKEND_NOTE).read_text() == "rocksdb\n"  # the run's folder is named by its job id


def test_a_stopped_job_resumes_from_its_savepoint_on_another_state_backend(cfg, tmp_path):
    """`flead stream stop` (SIGTERM to the job's process alone) stops the job with a canonical savepoint; started on
    RocksDB from it, every model continues, no reading is lost and none scored before the stop is scored again: a
    deployment moves between state backends without starting its models again."""
    kill_mid_stream_and_restart(cfg, tmp_path, {"FLEAD_STREAM_STATE_BACKEND": "hashmap"}, stop_with_savepoint=True,
                                restart_settings={"FLEAD_STREAM_STATE_BACKEND": "rocksdb"})
    log = processes.log_path(tmp_path, "stream").read_text()
    assert "stopped with savepoint" in log, log[-3000:]


def scorer_counter(reporter_url: str, name: str) -> float | None:
    """A scorer counter from the job's Flink Prometheus reporter (summed over subtasks; None before it exists)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(reporter_url, timeout=5).text
    except httpx.HTTPError:
        return None
    values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.name == f"flink_taskmanager_job_task_operator_{name}"]
    return sum(values) if values else None


def test_a_partial_micro_batch_is_scored_when_the_device_goes_quiet(cfg, tmp_path):
    """A live job scores a device's last, partial micro-batch (fewer than `stream.micro_batch_size` readings) soon
    after the device goes quiet, by its processing-time flush timer, and counts it (``records_scored``: PyFlink
    runs timers outside the operator's metrics scope, see `flink_jobs.anomaly_job.ScorerCounters`). Bounded runs
    flush at the end of the input instead (the replay test)."""
    partial = cfg.stream.micro_batch_size - 4
    readings = asd_slice(cfg, "test", 1, partial)
    reporter_port = processes.free_port()
    env = {"FLEAD_STATE_DIR": str(tmp_path), "FLEAD_STREAM_CHECKPOINT_INTERVAL_MS": "1000",
           "FLEAD_STREAM_PARALLELISM": "1", "FLEAD_METRICS_FLINK_REPORTER_PORT": str(reporter_port),
           "FLEAD_INTEGRITY_KEY": signing_key(cfg).hex()}
    reporter_url = f"http://127.0.0.1:{reporter_port}/metrics"
    job_cfg = load_config(env={**os.environ, **env})
    pid = processes.start(tmp_path, "stream", [sys.executable, str(JOB)], env=env)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not completed_checkpoints(job_cfg):  # the job runs (it checkpoints): send now
            assert time.monotonic() < deadline, "no checkpoint: " + processes.log_tail(tmp_path, "stream", 60)
            assert processes.running_pid(tmp_path, "stream") == pid, processes.log_tail(tmp_path, "stream", 60)
            time.sleep(0.5)
        produce(readings, cfg.kafka.topics.telemetry, producer_config(cfg), key=signing_key(cfg),
                batch=cfg.stream.micro_batch_size)
        sent = time.monotonic()
        scores, counted = [], None
        while (len(scores) < partial or counted != partial) and time.monotonic() < sent + 15:
            time.sleep(0.5)
            scores, counted = read_to_end(cfg, "scores"), scorer_counter(reporter_url, "records_scored")
        waited = time.monotonic() - sent
    finally:
        processes.stop(tmp_path, "stream", grace=5)
    print(f"{len(scores)} of {partial} readings scored, {counted} counted, {waited:.1f} s after they were sent")
    assert sorted(s["seq"] for s in scores) == [r.seq for r in readings]
    assert counted == partial
