"""The Kafka → MongoDB sink on the real broker and database: every reading once in any batching, bad input as
one dead letter each, roll-ups exact after a crash, MongoDB outages waited out, retention enforced."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from confluent_kafka import Producer

from config import PROJECT_ROOT, load_config
from models.integrity import (sign_device_message, sign_message, sign_record, signing_key, verify_record,
                              wire_form)
from orchestration import stack as local_stack
from services import processes
from storage.buckets import SCORE_COLUMNS, unpack_columns
from storage.mongo import Store
from storage.sink import MongoSink
from telemetry.schema import Reading, encode_batch, encode_scores

pytestmark = pytest.mark.integration

SHARED = ("device_id", "model_version", "global_version", "scored_at")


def _score(device, seq, anomaly=False, **change):
    return {"device_id": device, "seq": seq, "ts": 1_700_000_000_000 + seq * 60_000, "score": 0.5, "threshold": 1.0,
            "is_anomaly": anomaly, "top_metrics": [{"metric": "m00", "share": 1.0}], "model_version": 1,
            "global_version": 0, "label": 0, "scored_at": 1_700_000_000_100 + seq, "p_value": 0.5,
            "incident_id": f"{device}:{seq}" if anomaly else None, **change}


def _batch_message(cfg, records):
    """One scores-topic message as the stream job sends it: one device's micro-batch, signed."""
    first = records[0]
    return sign_message(encode_scores(first["device_id"], first["model_version"], first["global_version"],
                                      first["scored_at"], [{k: v for k, v in r.items() if k not in SHARED}
                                                           for r in records]), signing_key(cfg))


def _telemetry(cfg, device, readings):
    """One telemetry message as the device sends it: signed with its token."""
    return sign_device_message(encode_batch(device, readings), signing_key(cfg), device)


def _fast(cfg, **env):
    """The test's config with a short flush interval (and any other FLEAD_* overrides)."""
    return load_config(env={**os.environ, **cfg.to_env(), "FLEAD_SINK_FLUSH_INTERVAL_MS": "200", **env})


def _stored_seqs(store, device):
    return sorted(int(s) for d in store.find("predictions", {"device_id": device})
                  for s in unpack_columns(d, SCORE_COLUMNS)["seq"])


def _rollup_total(store, key, field="n"):
    return sum(d[field] for d in store.find(key))


def test_sink_stores_each_record_once_and_dead_letters_bad_ones(cfg, store):
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    topics, key = cfg.kafka.topics, signing_key(cfg)
    for seq in range(0, 300, 10):
        # every score twice (at-least-once delivery must still give one copy): as the stream job sends them
        # (batches of one device's records) and as single records
        batch = [_score("d1", s, anomaly=s % 50 == 0) for s in range(seq, seq + 10)]
        producer.produce(topics.scores, key="d1", value=_batch_message(cfg, batch))
        for record in batch:
            producer.produce(topics.scores, key="d1", value=sign_message(json.dumps(record).encode(), key))
    producer.produce(topics.scores, key="d1", value=sign_message(b"{not json}", key))
    producer.produce(topics.scores, key="d1", value=sign_message(b'{"schema": "flead.scores/1", "scores": "none"}', key))
    producer.produce(topics.scores, key="d1", value=sign_message(json.dumps({**_score("d1", 999), "score": "high"})
                                                                 .encode(), key))
    readings = [Reading("d1", seq, 1_700_000_000_000 + seq, {"m00": 0.1, "m01": float("nan")}) for seq in range(100)]
    producer.produce(topics.telemetry, key="d1", value=_telemetry(cfg, "d1", readings))
    producer.produce(topics.telemetry, key="d1", value=b"garbage")
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg)).run(until_idle_s=3.0)

    assert store.count_readings("predictions") == 300 and _stored_seqs(store, "d1") == list(range(300))
    assert store.collection("alerts").count_documents({}) == 6
    assert _rollup_total(store, "fleet_rollups") == 300 and _rollup_total(store, "fleet_rollups", "anomalies") == 6
    assert _rollup_total(store, "score_rollups") == 300 and _rollup_total(store, "daily_rollups") == 300
    assert max(d["anomaly_score_max"] for d in store.find("score_rollups") if d["anomalies"]) == 0.5
    assert store.count_readings("device_data") == 100 and _rollup_total(store, "metric_rollups") == 100
    values = store.device_readings(["d1"])["d1"]
    assert values["names"] == ["m00", "m01"] and np.isnan(values["values"][:, 1]).all()
    reasons = [d["reason"] for d in store.find("dead_letters")]
    assert any("not JSON" in r for r in reasons) and any("score record.score: expected" in r for r in reasons)
    assert "scores: scores: expected a list of objects" in reasons
    assert stats["telemetry_invalid"] == 1 and stats["scores_refused"] == 3 and stats["replayed"] == 300


def test_replaying_in_other_batchings_leaves_one_copy_of_each_reading(cfg, store):
    """A stream job restarted from a checkpoint sends readings again in other micro-batch groupings; a sink
    restarted from older offsets reads them again: each reading stays stored once, roll-ups count it once."""
    records = {d: [_score(d, s, anomaly=s % 17 == 0) for s in range(200)] for d in ("r1", "r2")}
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})

    def send(size, start=0):
        for device, recs in records.items():
            for i in range(start, len(recs), size):
                producer.produce(cfg.kafka.topics.scores, key=device, value=_batch_message(cfg, recs[i:i + size]))
        assert producer.flush(30) == 0

    send(16)
    MongoSink(_fast(cfg)).run(until_idle_s=2.0)
    send(10, start=37)  # the replay, regrouped
    send(7, start=150)
    MongoSink(_fast(cfg)).run(until_idle_s=2.0)
    MongoSink(_fast(cfg), group_id="flead-mongo-sink-from-the-start").run(until_idle_s=2.0)  # every message again

    for device in records:
        assert _stored_seqs(store, device) == list(range(200))
    flagged = sum(r["is_anomaly"] for recs in records.values() for r in recs)
    assert store.collection("alerts").count_documents({}) == flagged
    assert _rollup_total(store, "fleet_rollups") == 400 == _rollup_total(store, "score_rollups")
    assert _rollup_total(store, "fleet_rollups", "anomalies") == flagged


def test_identical_bad_messages_are_each_kept_once(cfg, store):
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    letter = {"schema": "flead.dead-letter/1", "source": "flead.telemetry", "reason": "missing field 'ts'",
              "raw": "{}", "device_id": None, "at": 1}
    for _ in range(109):
        producer.produce(cfg.kafka.topics.scores, key="x", value=sign_message(b"{oops}", signing_key(cfg)))
        producer.produce(cfg.kafka.topics.dead_letters, value=json.dumps(sign_record(letter, signing_key(cfg))))
    forged = {**letter, "reason": "made up by a writer of the topic"}  # unsigned: not the stream job's
    producer.produce(cfg.kafka.topics.dead_letters, value=json.dumps(forged))
    assert producer.flush(30) == 0

    MongoSink(_fast(cfg)).run(until_idle_s=2.0)
    MongoSink(_fast(cfg), group_id="flead-mongo-sink-again").run(until_idle_s=2.0)  # a replay of everything

    assert store.collection("dead_letters").count_documents({"reason": {"$regex": "not JSON"}}) == 109
    assert store.collection("dead_letters").count_documents({"reason": "missing field 'ts'"}) == 109
    assert store.collection("dead_letters").count_documents({"reason": forged["reason"]}) == 0
    unsigned = {"reason": "dead_letters: unsigned: no 'signature' field"}
    assert store.collection("dead_letters").count_documents(unsigned) == 1  # stored as a refusal of its own


def test_a_non_finite_score_is_one_dead_letter_and_the_batch_is_written_whole(cfg, store, monkeypatch):
    """It used to switch the sink to writing record by record (1.4 records/s): now a batch takes the same few
    writes whatever it holds."""
    calls = []
    original = Store.insert_new

    def counting(self, key, docs, need_id=True):
        docs = list(docs)
        calls.append((key, len(docs)))
        return original(self, key, docs, need_id)

    monkeypatch.setattr(Store, "insert_new", counting)
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for start in range(0, 2000, 16):
        batch = [_score("n1", s) for s in range(start, start + 16)]
        if start == 320:
            batch[3]["score"] = float("nan")  # a NaN token in the JSON
            producer.produce(cfg.kafka.topics.scores, key="n1", value=sign_message(json.dumps(
                {"schema": "flead.scores/1", "device_id": "n1", "model_version": 1, "global_version": 0,
                 "scored_at": 1, "scores": [{k: v for k, v in r.items() if k not in SHARED} for r in batch]},
                allow_nan=True).encode(), signing_key(cfg)))
            continue
        producer.produce(cfg.kafka.topics.scores, key="n1", value=_batch_message(cfg, batch))
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg, FLEAD_SINK_FLUSH_INTERVAL_MS="5000")).run(until_idle_s=2.0)

    assert store.count_readings() == 1999 and 323 not in _stored_seqs(store, "n1")
    [letter] = store.find("dead_letters")
    assert "score record.score: not a finite number (nan)" in letter["reason"] and letter["device_id"] == "n1"
    assert stats["scores_refused"] == 1
    predictions_writes = [n for key, n in calls if key == "predictions"]
    assert len(predictions_writes) <= 3 and sum(predictions_writes) <= 3  # one bucket per flush, not per record


def test_timestamps_that_would_overflow_roll_ups_are_dead_letters_and_rebuild_survives_old_ones(cfg, store):
    """ts = -(2^63 - 1) used to crash the sink (and `flead sink rebuild-rollups`) with an OverflowError."""
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    extreme = -(2**63 - 1)
    producer.produce(cfg.kafka.topics.scores, key="t1", value=_batch_message(
        cfg, [_score("t1", 0), _score("t1", 1, ts=extreme), _score("t1", 2)]))
    producer.produce(cfg.kafka.topics.telemetry, key="t1", value=_telemetry(
        cfg, "t1", [Reading("t1", 0, 1_706_659_200_000, {"a": 1.0}), Reading("t1", 1, extreme, {"a": 2.0})]))
    producer.produce(cfg.kafka.topics.telemetry, key="t1", value=_telemetry(
        cfg, "t1", [Reading("t1", 2, 1_706_659_260_000, {"a": 3.0})]))
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg)).run(until_idle_s=2.0)

    assert _stored_seqs(store, "t1") == [0, 2] and store.count_readings("device_data") == 1
    [letter] = store.find("dead_letters")
    assert "ts: -9223372036854775807 is outside the storable range" in letter["reason"]
    assert stats["scores_refused"] == 1
    assert stats["telemetry_invalid"] == 1  # its wire format bounds ts: the stream job dead-letters that message
    # a database written before this check may hold such a reading: rebuilding the roll-ups skips it
    [doc] = store.find("predictions")
    columns = dict(doc["columns"])
    columns["ts"] = np.array([1000, extreme], dtype="<i8").tobytes()
    store.collection("predictions").delete_many({})
    store.insert_new("predictions", [{**doc, "columns": columns, "ts_min": extreme}])
    assert store.rebuild_rollups() == (2, 4)  # 2 scores read; the good one in 3 roll-ups, its telemetry in 1
    assert _rollup_total(store, "fleet_rollups") == 1


def test_a_forged_snapshot_is_dead_lettered_and_cannot_hide_the_genuine_one(cfg, store):
    """Snapshots are stored under their natural id (device, version): a forged copy sent first must not take that
    id, or the aggregator would never see the device's genuine snapshot."""
    genuine = sign_record({"schema": "flead.snapshot/1", "device_id": "s1", "version": 3, "global_version": 0,
                           "n_samples": 64, "n_seen": 192, "loss": 0.01, "weights": "AAAA", "created_at": 1000},
                          signing_key(cfg))
    forged = {**genuine, "weights": "BBBB"}              # altered after signing
    unsigned = {k: v for k, v in genuine.items() if k != "signature"}
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for record in (forged, unsigned, genuine):
        producer.produce(cfg.kafka.topics.snapshots, key="s1", value=json.dumps(record))
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg)).run(until_idle_s=2.0)

    [stored] = store.find("local_models")
    assert stored["_id"] == "s1:3" and stored["weights"] == "AAAA"
    assert verify_record(wire_form(stored, "flead.snapshot/1"), signing_key(cfg)) is None
    reasons = sorted(letter["reason"] for letter in store.find("dead_letters"))
    assert reasons == ["snapshots: bad signature: the record was altered or signed with another key",
                       "snapshots: unsigned: no 'signature' field"]
    assert stats["snapshots_refused"] == 2 and stats["local_models"] == 1


def test_forged_scores_and_telemetry_are_dead_lettered_and_cannot_hide_the_genuine_ones(cfg, store):
    """The sink keeps each reading's score and telemetry once per (device, seq): a forged copy sent first used to
    take that place and the genuine one counted as `replayed`, so anyone able to write to Kafka could hide a
    device's alerts (and readings) from storage and the dashboards."""
    key = signing_key(cfg)
    genuine = [_score("f1", s, anomaly=s == 3) for s in range(16)]
    quiet = [{**r, "is_anomaly": False, "incident_id": None, "score": 0.1} for r in genuine]
    unsigned = encode_scores("f1", 1, 0, genuine[0]["scored_at"], [{k: v for k, v in r.items() if k not in SHARED}
                                                                   for r in quiet])
    readings = [Reading("f1", s, 1_700_000_000_000 + s * 60_000, {"m00": 0.5}) for s in range(16)]
    fake = [Reading("f1", s, r.ts, {"m00": 0.0}) for s, r in enumerate(readings)]
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for value in (unsigned, sign_message(unsigned, bytes(32)),
                  _batch_message(cfg, genuine).replace(b'"is_anomaly":true', b'"is_anomaly":false')):
        producer.produce(cfg.kafka.topics.scores, key="f1", value=value)
    for value in (encode_batch("f1", fake), sign_device_message(encode_batch("f1", fake), key, "f2"),
                  sign_device_message(encode_batch("f1", fake), bytes(32), "f1")):
        producer.produce(cfg.kafka.topics.telemetry, key="f1", value=value)
    producer.produce(cfg.kafka.topics.scores, key="f1", value=_batch_message(cfg, genuine))
    producer.produce(cfg.kafka.topics.telemetry, key="f1", value=_telemetry(cfg, "f1", readings))
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg)).run(until_idle_s=2.0)

    assert _stored_seqs(store, "f1") == list(range(16)) and stats["replayed"] == 0
    [alert] = store.find("alerts")
    assert alert["seq"] == 3 and alert["device_id"] == "f1"
    assert store.device_readings(["f1"])["f1"]["values"][:, 0].tolist() == [0.5] * 16
    reasons = sorted(letter["reason"] for letter in store.find("dead_letters"))
    assert reasons == ["scores: bad signature: the message was altered or signed with another key"] * 2 + [
        "scores: unsigned: no 'signature' field"]
    assert stats["scores_refused"] == 3 and stats["telemetry_refused"] == 3  # the stream job dead-letters those


def test_incidents_keep_their_latest_state_and_drift_events_are_stored(cfg, store):
    def incident(status, end_seq, n_flagged):
        return {"schema": "flead.incident/1", "incident_id": "i1:100", "device_id": "i1", "status": status,
                "start_seq": 100, "end_seq": end_seq, "start_ts": 1000, "end_ts": 1000 + end_seq,
                "n_flagged": n_flagged, "n_readings": end_seq - 99, "peak_score": 3.5, "peak_ratio": 2.1,
                "metrics_to_blame": [{"metric": "m03", "share": 0.6}], "model_version": 4, "global_version": 1,
                "updated_at": 5000 + end_seq}

    def signed(record):  # as the stream job sends them
        return json.dumps(sign_record(record, signing_key(cfg)))

    drift = {"schema": "flead.drift/1", "event_id": "i1:300", "device_id": "i1", "seq": 300, "ts": 9000,
             "reason": "flag rate 0.2 over 200 readings (target 0.01)", "flag_rate": 0.2, "target_rate": 0.01,
             "window": 200, "detected_at": 9100, "model_version": 4}
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for record in (incident("open", 104, 3), incident("open", 110, 6)):
        producer.produce(cfg.kafka.topics.incidents, key="i1", value=signed(record))
    stuck = {**incident("resolved", 140, 11), "incident_id": "i1:130:stuck", "start_seq": 130,
             "metrics_to_blame": [{"metric": "m05", "share": 1.0}],
             "stuck_metrics": [{"metric": "m05", "repeats": 15, "usual": 2}]}   # a stuck-metric incident
    producer.produce(cfg.kafka.topics.incidents, key="i1", value=signed(stuck))
    producer.produce(cfg.kafka.topics.drift, key="i1", value=signed(drift))
    producer.produce(cfg.kafka.topics.drift, key="i1", value=json.dumps({**drift, "event_id": "i1:301"}))  # unsigned
    producer.produce(cfg.kafka.topics.incidents, key="i1", value=signed({**incident("open", 1, 1), "$x": 1}))
    assert producer.flush(30) == 0
    MongoSink(_fast(cfg)).run(until_idle_s=2.0)
    forged = {**json.loads(signed(incident("resolved", 999, 9))), "updated_at": 10**12}  # newest state, forged
    for value in (signed(incident("resolved", 120, 8)), signed(incident("open", 112, 7)), json.dumps(forged)):
        producer.produce(cfg.kafka.topics.incidents, key="i1", value=value)  # a late, older state comes after
    assert producer.flush(30) == 0
    MongoSink(_fast(cfg)).run(until_idle_s=2.0)

    stored, held = sorted(store.find("incidents"), key=lambda d: d["_id"])
    assert (stored["_id"], stored["status"], stored["end_seq"], stored["n_flagged"]) == ("i1:100", "resolved", 120, 8)
    assert held["_id"] == "i1:130:stuck" and held["stuck_metrics"] == [{"metric": "m05", "repeats": 15, "usual": 2}]
    assert [d["_id"] for d in store.find("drift_events")] == ["i1:300"]
    reasons = sorted(letter["reason"] for letter in store.find("dead_letters"))
    assert reasons[:2] == ["drift: unsigned: no 'signature' field",
                           "incidents: bad signature: the record was altered or signed with another key"], reasons
    assert "field name '$x' is not a plain identifier" in reasons[2]


def test_retention_deletes_raw_data_before_summaries(cfg, store):
    store.write_scores([_score("old", s, anomaly=s == 3) for s in range(10)])
    day = 86_400_000
    for key in ("predictions", "alerts", "fleet_rollups"):  # stored 10 days ago
        store.collection(key).update_many({}, {"$inc": {"stored_at": -10 * day}})
    store.write_scores([_score("new", s) for s in range(5)])

    deleted = store.prune()

    assert deleted["predictions"] == 1 and deleted["alerts"] == 1 and deleted["fleet_rollups"] == 0
    assert store.count_readings() == 5 and _rollup_total(store, "fleet_rollups") == 15  # roll-ups kept longer
    assert store.prune(now_ms=int(time.time() * 1000) + 100 * day)["fleet_rollups"] > 0


def test_the_sink_waits_out_a_mongodb_outage(cfg, tmp_path):
    """It used to exit on the first refused connection; now it retries with back-off and stores everything."""
    own = load_config(env={**os.environ, **cfg.to_env(), "FLEAD_STATE_DIR": str(tmp_path),
                           "FLEAD_MONGO_PORT": str(processes.free_port()), "FLEAD_SINK_FLUSH_INTERVAL_MS": "200",
                           "FLEAD_SINK_RETRY_MAX_S": "1"})
    local_stack.start_mongo(own)
    try:
        with Store(own) as setup:
            setup.init()
        producer = Producer({"bootstrap.servers": own.kafka_bootstrap})
        sink, stopping = MongoSink(own), threading.Event()
        runner = threading.Thread(target=sink.run, kwargs={"should_stop": stopping.is_set}, daemon=True)
        runner.start()
        producer.produce(own.kafka.topics.scores, key="o1",
                         value=_batch_message(own, [_score("o1", s) for s in range(50)]))
        producer.flush(30)
        _wait(lambda: sink.stats["predictions"] == 50)
        processes.stop(own.state_dir, local_stack.MONGO)
        producer.produce(own.kafka.topics.scores, key="o1",
                         value=_batch_message(own, [_score("o1", s) for s in range(50, 120)]))
        producer.flush(30)
        _wait(lambda: sink.stats["mongo_retries"] >= 2)
        local_stack.start_mongo(own)
        _wait(lambda: sink.stats["predictions"] == 120)
        assert runner.is_alive()
        stopping.set()
        runner.join(30)
        with Store(own) as after:
            assert _stored_seqs(after, "o1") == list(range(120)) and _rollup_total(after, "fleet_rollups") == 120
    finally:
        processes.stop(own.state_dir, local_stack.MONGO)


def test_roll_ups_are_exact_after_the_sink_is_killed(cfg, store):
    """kill -9 of a running sink between its writes used to leave roll-ups short; the next start repairs them."""
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for start in range(0, 20_000, 16):
        device = f"k{start // 16 % 10}"
        producer.produce(cfg.kafka.topics.scores, key=device,
                         value=_batch_message(cfg, [_score(device, s, anomaly=s % 97 == 0)
                                                    for s in range(start, start + 16)]))
    assert producer.flush(60) == 0
    env = {**os.environ, **cfg.to_env(), "FLEAD_SINK_FLUSH_INTERVAL_MS": "100", "FLEAD_SINK_MAX_BATCH_MESSAGES": "50",
           "FLEAD_ROLLUPS_GENERATION_S": "1000"}  # many small batches, no roll-up written before the kill
    sink = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "sink", "run"], env=env, cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: store.count_readings() > 2_000)
    finally:
        sink.send_signal(signal.SIGKILL)
        sink.wait(30)

    again = MongoSink(load_config(env=env))  # runs until everything is stored (or fails after 5 minutes)
    deadline = time.monotonic() + 300
    again.run(should_stop=lambda: store.count_readings() >= 20_000 or time.monotonic() > deadline)

    expected = sum(1 for s in range(20_000) if s % 97 == 0)
    assert store.count_readings() == 20_000 == _rollup_total(store, "fleet_rollups")
    assert _rollup_total(store, "score_rollups") == 20_000 == _rollup_total(store, "daily_rollups")
    assert _rollup_total(store, "fleet_rollups", "anomalies") == expected == store.collection("alerts").count_documents({})


def _wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_metric_names_that_mean_something_to_mongodb_are_stored_as_sent(cfg, store):
    """Metric names are the devices' own: '$where', 'a.b', '_id', unicode and 200 characters must neither break a
    write nor reach a query as an operator; the readings, roll-ups and the device's summary keep them verbatim."""
    names = ["$where", "a.b", "_id", "métrique µs", "x" * 200, "$"]
    readings = [Reading("hostile-names", seq, 1_700_000_000_000 + seq * 60_000,
                        {name: float(seq + i) for i, name in enumerate(names)}) for seq in range(50)]
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    producer.produce(cfg.kafka.topics.telemetry, key="hostile-names", value=_telemetry(cfg, "hostile-names", readings))
    assert producer.flush(30) == 0

    stats = MongoSink(_fast(cfg)).run(until_idle_s=3.0)

    assert stats["telemetry_invalid"] == 0 and store.count_readings("device_data") == 50
    values = store.device_readings(["hostile-names"])["hostile-names"]
    assert values["names"] == names and values["values"][:, 0].tolist() == [float(s) for s in range(50)]
    rolled = {m["name"] for d in store.find("metric_rollups") for m in d["metrics"]}
    assert rolled == set(names) and _rollup_total(store, "metric_rollups") == 50
