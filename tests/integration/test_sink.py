"""The Kafka → MongoDB sink on the real broker and database: every record once, bad ones dead-lettered."""
import json

import pytest
from confluent_kafka import Producer

from storage import mongo
from storage.sink import MongoSink
from telemetry.schema import Reading, encode_batch, encode_scores

pytestmark = pytest.mark.integration


def _score(device, seq, anomaly=False):
    return {"device_id": device, "seq": seq, "ts": 1_700_000_000_000 + seq, "score": 0.5, "threshold": 1.0,
            "is_anomaly": anomaly, "top_metrics": [{"metric": "m00", "share": 1.0}], "model_version": 1,
            "global_version": 0, "label": 0, "scored_at": 1_700_000_000_100 + seq}


def test_sink_stores_each_record_once_and_dead_letters_bad_ones(cfg, db):
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    topics = cfg.kafka.topics
    for seq in range(0, 300, 10):
        # every score twice (at-least-once delivery must still give one document), as the stream job sends them
        # (batches of one device's records) and as single records
        batch = [_score("d1", s, anomaly=s % 50 == 0) for s in range(seq, seq + 10)]
        shared = ("device_id", "model_version", "global_version", "scored_at")
        producer.produce(topics.scores, key="d1", value=encode_scores(
            "d1", 1, 0, batch[0]["scored_at"], [{k: v for k, v in r.items() if k not in shared} for r in batch]))
        for record in batch:
            producer.produce(topics.scores, key="d1", value=json.dumps(record))
    producer.produce(topics.scores, key="d1", value=b"{not json")
    producer.produce(topics.scores, key="d1", value=b'{"schema": "flead.scores/1", "scores": "none"}')
    producer.produce(topics.scores, key="d1", value=json.dumps({**_score("d1", 999), "score": "high"}))
    readings = [Reading("d1", seq, 1_700_000_000_000 + seq, {"m00": 0.1, "m01": float("nan")}) for seq in range(100)]
    producer.produce(topics.telemetry, key="d1", value=encode_batch("d1", readings))
    producer.produce(topics.telemetry, key="d1", value=b"garbage")
    assert producer.flush(30) == 0

    stats = MongoSink(cfg).run(until_idle_s=3.0)

    assert mongo.collection(db, cfg, "predictions").count_documents({}) == 300
    assert mongo.collection(db, cfg, "alerts").count_documents({}) == 6
    rollups = list(mongo.collection(db, cfg, "score_rollups").find())  # each new record summed once
    assert sum(r["n"] for r in rollups) == 300 and sum(r["anomalies"] for r in rollups) == 6
    assert max(r["anomaly_score_max"] for r in rollups if r["anomalies"]) == 0.5
    assert mongo.collection(db, cfg, "device_data").count_documents({}) == 100
    assert mongo.collection(db, cfg, "device_data").find_one({"seq": 5})["metrics"]["m01"] is None
    reasons = [d["reason"] for d in mongo.collection(db, cfg, "dead_letters").find()]
    assert any("not JSON" in r for r in reasons) and any("predictions.score" in r for r in reasons)
    assert "scores: scores: expected a list of objects" in reasons
    assert stats["telemetry_invalid"] == 1 and stats["scores_invalid"] == 1


def test_a_second_sink_run_resumes_from_committed_offsets(cfg, db):
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for seq in range(50):
        producer.produce(cfg.kafka.topics.scores, key="d2", value=json.dumps(_score("d2", seq)))
    producer.flush(30)
    assert MongoSink(cfg).run(until_idle_s=2.0)["predictions"] == 50
    assert MongoSink(cfg).run(until_idle_s=2.0)["predictions"] == 0
    assert mongo.collection(db, cfg, "predictions").count_documents({}) == 50


def test_rollups_add_only_new_records_to_stored_buckets(cfg, db):
    first = [_score("d3", seq, anomaly=seq == 5) for seq in range(10)]
    mongo.write_predictions(db, cfg, first)
    mongo.write_predictions(db, cfg, first[5:] + [{**_score("d3", seq), "score": 2.5} for seq in range(10, 20)])
    [bucket] = mongo.collection(db, cfg, "score_rollups").find({"device_id": "d3"})
    assert (bucket["n"], bucket["anomalies"], bucket["score_sum"]) == (20, 1, 10 * 0.5 + 10 * 2.5)
    assert (bucket["score_max"], bucket["anomaly_score_max"], bucket["threshold_max"]) == (2.5, 0.5, 1.0)


def test_rebuilt_rollups_equal_the_ones_the_sink_kept(cfg, db):
    mongo.write_predictions(db, cfg, [_score("d4", seq, anomaly=seq % 7 == 0) for seq in range(0, 3_000_000, 10_000)])
    rollups = mongo.collection(db, cfg, "score_rollups")
    kept = sorted(rollups.find(), key=lambda r: r["_id"])
    rollups.delete_many({"ts": {"$gte": kept[len(kept) // 2]["ts"]}})  # as if a sink died between its writes
    assert mongo.rebuild_rollups(db, cfg) == (300, len(kept))
    assert sorted(rollups.find(), key=lambda r: r["_id"]) == kept


def test_records_the_sink_cannot_store_become_dead_letters_not_crashes(cfg, db):
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    bad = {"scores": [{"device_id": "d5", "score": 1.0}, [1], None,
                      {"schema": "flead.scores/1", "device_id": "d5", "scores": [{"score": 2.0}]}],
           "snapshots": [{"device_id": "d5"}, [1], None], "dead_letters": [{"source": "x"}, "text"],
           "telemetry": [None]}
    for key, values in bad.items():
        for value in values:
            producer.produce(cfg.kafka.topics[key], None if value is None else json.dumps(value), key="d5")
    assert producer.flush(30) == 0

    stats = MongoSink(cfg).run(until_idle_s=3.0)

    reasons = sorted(d["reason"] for d in mongo.collection(db, cfg, "dead_letters").find())
    assert reasons == sorted([
        "schema: predictions: missing required field 'seq'", "schema: predictions: missing required field 'seq'",
        "scores: not a JSON object: got list", "scores: no value (a tombstone record)",
        "schema: local_models: missing required field 'version'", "snapshots: not a JSON object: got list",
        "snapshots: no value (a tombstone record)", "schema: dead_letters: missing required field 'reason'",
        "dead_letters: not a JSON object: got str"])
    assert stats["telemetry_invalid"] == 1  # the stream job dead-letters telemetry; the sink counts it
