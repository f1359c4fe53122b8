"""Bucketed readings and scores (storage.buckets, storage.writer) without a server: packing, the seq index,
validation, and exactly-once writes whatever the batching, on an in-memory stand-in for the Store."""
import random
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from config import load_config
from storage.buckets import (SCORE_COLUMNS, ScorePart, SeqIndex, newest_buckets, pack, reading_bucket, readings_of,
                             records_block, score_block, score_bucket, score_records, unpack, unpack_columns)
from storage.mongo import retention_cutoffs
from storage.writer import BucketWriter
from telemetry.schema import Columns


class MemoryCollection:
    """What BucketWriter needs of a collection, in memory."""

    def __init__(self):
        self.docs = {}

    def find(self, query=None):
        return list(self.docs.values())

    def find_one(self, query):
        return self.docs.get(query["_id"])

    def delete_many(self, query):
        if not query:
            self.docs.clear()
        for i in query.get("_id", {}).get("$in", []):
            self.docs.pop(i, None)


class MemoryStore:
    """The part of `storage.mongo.Store` BucketWriter uses, in memory (insert-only, first write wins)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.collections = defaultdict(MemoryCollection)

    def collection(self, key):
        return self.collections[key]

    def insert_new(self, key, docs):
        new = [d for d in docs if d["_id"] not in self.collections[key].docs]
        for d in new:
            self.collections[key].docs[d["_id"]] = d
        return new

    def find(self, key, query=None, fields=None):
        docs = self.collections[key].docs.values()
        if query and "_id" in query:
            docs = [d for d in docs if d["_id"] in set(query["_id"]["$in"])]
        return list(docs)

    def upsert(self, key, docs):
        for d in docs:
            self.collections[key].docs[d["_id"]] = d
        return len(docs)

    def sink_state(self, name):
        return self.collections["sink_state"].docs.get(name, {})

    def set_sink_state(self, name, values):
        self.collections["sink_state"].docs[name] = {**values, "_id": name}


CFG = load_config(env={})


def _score(device, seq, anomaly=False, score=0.5):
    return {"device_id": device, "seq": seq, "ts": 1_700_000_000_000 + seq * 60_000, "score": score,
            "threshold": 1.0, "is_anomaly": anomaly, "top_metrics": [{"metric": "m00", "share": 1.0}],
            "model_version": 1, "global_version": 0, "label": int(anomaly), "scored_at": 1, "p_value": 0.5,
            "incident_id": f"{device}:{seq}" if anomaly else None}


def blocks(records):
    """Score records as the sink passes them to the writer: one block per device."""
    by_device = defaultdict(list)
    for r in records:
        by_device[r["device_id"]].append(r)
    return [score_block(device, [ScorePart(None, {}, recs)])[0] for device, recs in by_device.items()]


def stored_readings(store, key="predictions"):
    """(device, seq) of every reading in the bucket documents of `key`, with repeats."""
    out = []
    for doc in store.collections[key].docs.values():
        out += [(doc["device_id"], int(s)) for s in unpack_columns(doc, SCORE_COLUMNS)["seq"]]
    return out


def test_a_bucket_round_trips_its_records():
    records = [_score("a", s, anomaly=s == 2) for s in range(5)]
    records[0]["threshold"], records[1]["label"], records[3]["p_value"] = None, None, None
    doc = score_bucket("a", records_block("a", records).cols, generation=3, stored_at=9)
    assert (doc["_id"], doc["n"], doc["anomalies"], doc["seq_first"], doc["seq_last"]) == ("a:0", 5, 1, 0, 4)
    back = score_records(doc)
    for original, stored in zip(records, back):
        assert {k: original[k] for k in stored} == stored


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=80), st.lists(st.integers(0, 220), max_size=80),
       st.integers(1, 8))
def test_seq_index_never_calls_a_stored_seq_new(stored, asked, max_gaps):
    index = SeqIndex(max_gaps=max_gaps)
    for chunk in range(0, len(stored), 7):
        index.add("d", np.array(stored[chunk:chunk + 7]))
    unstored = index.unstored("d", np.array(asked, dtype=np.int64))
    for seq, new in zip(asked, unstored):
        if seq in stored:
            assert not new
    if max_gaps >= len(stored):  # with room for every gap, the index is exact
        assert unstored.tolist() == [seq not in stored for seq in asked]
    assert len(index.intervals.get("d", [])) <= max_gaps + 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 40), st.integers(1, 40))
def test_replaying_with_any_batching_stores_each_reading_once(seed, first_batch, second_batch):
    """A stream job restarted from a checkpoint re-sends readings in other micro-batch groupings; a sink restarted
    from older Kafka offsets reads them again: every reading ends up stored exactly once, roll-ups count it once."""
    rng = random.Random(seed)
    records = [_score(f"d{d}", seq, anomaly=rng.random() < 0.1) for d in range(3) for seq in range(60)]
    rng.shuffle(records)
    records.sort(key=lambda r: (r["seq"], r["device_id"]))  # each device's records in seq order, interleaved
    store = MemoryStore(CFG)
    writer = BucketWriter(store)
    writer.load()
    cut = rng.randrange(len(records))
    for start in range(0, cut, first_batch):  # first run: stops at `cut`
        writer.write(scores=blocks(records[start:min(start + first_batch, cut)]))
        writer.close_generation(force=rng.random() < 0.3)
    restarted = BucketWriter(store)  # a new sink process: the index comes from the database
    restarted.load()
    replay_from = rng.randrange(cut + 1)
    replay = records[replay_from:] + records[replay_from:replay_from + 10]  # and duplicates inside a batch
    for start in range(0, len(replay), second_batch):
        restarted.write(scores=blocks(replay[start:start + second_batch]))
    restarted.close_generation(force=True)

    stored = stored_readings(store)
    assert sorted(stored) == sorted((r["device_id"], r["seq"]) for r in records)
    assert len(store.collections["alerts"].docs) == sum(r["is_anomaly"] for r in records)
    fleet = store.collections["fleet_rollups"].docs.values()
    assert sum(d["n"] for d in fleet) == len(records)
    assert sum(d["anomalies"] for d in fleet) == sum(r["is_anomaly"] for r in records)
    devices = store.collections["score_rollups"].docs.values()
    assert sum(d["n"] for d in devices) == len(records)


def test_a_late_reading_fills_its_gap_and_is_stored():
    store = MemoryStore(CFG)
    writer = BucketWriter(store)
    writer.load()
    writer.write(scores=[records_block("d", [_score("d", s) for s in (0, 1, 2, 5, 6)])])
    writer.write(scores=[records_block("d", [_score("d", s) for s in (3, 4, 5)])])
    assert sorted(stored_readings(store)) == [("d", s) for s in range(7)]


def test_roll_ups_of_a_generation_the_sink_did_not_close_are_written_at_the_next_start():
    store = MemoryStore(CFG)
    writer = BucketWriter(store)
    writer.load()
    writer.write(scores=[records_block("d", [_score("d", s) for s in range(10)])])
    writer.close_generation(force=True)
    writer.write(scores=[records_block("d", [_score("d", s) for s in range(10, 25)])])  # ... and the process dies
    assert sum(d["n"] for d in store.collections["fleet_rollups"].docs.values()) == 10

    found = BucketWriter(store).load()

    assert found["repaired_generations"] == [2]
    assert sum(d["n"] for d in store.collections["fleet_rollups"].docs.values()) == 25
    assert BucketWriter(store).load()["repaired_generations"] == []  # nothing twice


def _totals(store, key):
    totals = defaultdict(lambda: [0, 0])
    for doc in store.collections[key].docs.values():
        totals[(doc.get("device_id"), doc["ts"])][0] += doc["n"]
        totals[(doc.get("device_id"), doc["ts"])][1] += doc.get("anomalies", 0)
    return dict(totals)


def test_compaction_merges_partials_and_finishes_after_a_crash():
    store = MemoryStore(CFG)
    writer = BucketWriter(store)
    writer.load()
    for start in range(0, 120, 10):  # one generation per 10 readings: many partials per bucket
        writer.write(scores=blocks([_score(f"d{d}", s, anomaly=s % 7 == 0) for d in range(2)
                                    for s in range(start, start + 10)]))
        writer.close_generation(force=True)
    before = {key: _totals(store, key) for key in ("score_rollups", "fleet_rollups", "daily_rollups")}
    count = len(store.collections["fleet_rollups"].docs)

    removed = writer.compact_rollups()

    assert removed["fleet_rollups"] > 0 and len(store.collections["fleet_rollups"].docs) < count
    assert {key: _totals(store, key) for key in before} == before
    assert writer.compact_rollups() == {}  # nothing left to merge
    # a crash after the merged documents went in, before the partials went out: the next start finishes it
    writer.write(scores=blocks([_score("d0", s) for s in range(120, 130)]))
    writer.close_generation(force=True)
    writer.write(scores=blocks([_score("d0", s) for s in range(130, 140)]))
    writer.close_generation(force=True)
    key = "fleet_rollups"
    sources = [i for i in store.collections[key].docs if not i.endswith("c")]
    store.set_sink_state("compaction", {"key": key, "sources": sources})
    totals = _totals(store, key)
    BucketWriter(store).load()
    assert _totals(store, key) == totals and store.sink_state("compaction")["sources"] == []


def test_readings_with_changing_metric_sets_keep_every_value():
    store = MemoryStore(CFG)
    writer = BucketWriter(store)
    writer.load()
    blocks = [Columns("d", ("a", "b"), np.array([[1.0, 2.0], [3.0, 4.0]]), [0, 1], [10, 20], [0, None]),
              Columns("d", ("b", "c"), np.array([[5.0, 6.0]]), [2], [30], [1])]
    assert writer.write(readings=blocks).device_data == 3
    [doc] = store.collections["device_data"].docs.values()
    cols = unpack_columns(doc, {"values": "<f8", "label": "|i1"})
    assert doc["metric_names"] == ["a", "b", "c"]
    assert np.array_equal(cols["values"], np.array([[1, 2, np.nan], [3, 4, np.nan], [np.nan, 5, 6]]), equal_nan=True)
    assert cols["label"].tolist() == [0, -1, 1]


@pytest.mark.parametrize("change, reason", [
    ({"score": float("nan")}, "not a finite number"),
    ({"score": float("inf")}, "not a finite number"),
    ({"score": None}, "score: expected"),
    ({"score": 1e301}, "not a finite number within"),
    ({"threshold": float("-inf")}, "not a finite number"),
    ({"ts": -(2**63 - 1)}, "outside the storable range"),
    ({"seq": 2**64}, "does not fit in 64 bits"),
    ({"p_value": 0.0}, "outside (0, 1]"),
    ({"is_anomaly": 1}, "is_anomaly: expected"),
    ({"is_anomaly": True, "top_metrics": [{"metric": 3}]}, "missing required field 'share'"),
])
def test_records_that_cannot_be_stored_are_named_with_a_reason(change, reason):
    records = [_score("d", s) for s in range(5)]
    records[2] = {**records[2], **change}
    block, bad = score_block("d", [ScorePart("t:0:7", {}, records)])
    assert [(p, i) for p, i, _, _ in bad] == [("t:0:7", 2)] and reason in bad[0][2]
    assert block.cols["seq"].tolist() == [0, 1, 3, 4]


def test_a_well_formed_batch_is_checked_column_wise_and_keeps_its_alerts():
    shared = {"device_id": "d", "model_version": 3, "global_version": 1, "scored_at": 9}
    items = [{k: v for k, v in _score("d", s, anomaly=s % 3 == 0).items() if k not in shared} for s in range(50)]
    parts = [ScorePart("t:0:1", shared, items[:20]), ScorePart("t:0:2", shared, items[20:])]
    block, bad = score_block("d", parts)
    assert bad == [] and block.cols["seq"].tolist() == list(range(50))
    assert block.cols["model_version"].tolist() == [3] * 50 and sorted(block.alerts) == list(range(0, 50, 3))
    assert block.alerts[3] == {**shared, **items[3]}


def test_a_record_of_another_device_in_a_batch_is_refused_and_so_is_an_empty_device_id():
    items = [_score("d", 0), _score("e", 1)]
    block, bad = score_block("d", [ScorePart("t:0:1", {}, items)])
    assert block.cols["seq"].tolist() == [0] and "in a batch of 'd'" in bad[0][2]
    block, bad = score_block("", [ScorePart("t:0:2", {}, [_score("", 0)])])
    assert block is None and "device_id: empty string" in bad[0][2]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_nan=True), max_size=300), st.sampled_from(["<f8", "<i8", "|u1"]))
def test_packed_columns_round_trip_compressed_or_not(values, dtype):
    floats = np.array(values, dtype=np.float64)
    array = floats if dtype == "<f8" else np.nan_to_num(floats, nan=0, posinf=0, neginf=0).clip(0, 255).astype(dtype)
    assert np.array_equal(unpack(pack(array, dtype), dtype), array, equal_nan=True)
    assert len(pack(np.zeros(1000), "<f8")) < 100  # repetitive columns are stored compressed


def test_retention_cuts_raw_data_sooner_than_summaries_and_zero_keeps_forever():
    day = 86_400_000
    cfg = load_config(env={"FLEAD_RETENTION_RAW_DAYS": "2", "FLEAD_RETENTION_SUMMARY_DAYS": "30"})
    cutoffs = retention_cutoffs(cfg, now_ms=100 * day)
    assert cutoffs["device_data"] == cutoffs["predictions"] == cutoffs["alerts"] == 98 * day
    assert cutoffs["score_rollups"] == cutoffs["incidents"] == cutoffs["dead_letters"] == 70 * day
    assert "global_models" not in cutoffs and "aggregation_history" not in cutoffs
    forever = retention_cutoffs(load_config(env={"FLEAD_RETENTION_RAW_DAYS": "0"}), now_ms=100 * day)
    assert "predictions" not in forever and forever["fleet_rollups"] == 10 * day



def test_batches_with_and_without_optional_fields_give_the_columns_of_their_records():
    """A part whose items all carry every field is read in one pass, one lacking optional fields field by field:
    both agree with the record-by-record path."""
    shared = {"device_id": "d", "model_version": 3, "global_version": 1, "scored_at": 9}
    items = [{k: v for k, v in _score("d", s, anomaly=s == 4).items() if k not in shared} for s in range(12)]
    for item in items[6:]:
        del item["p_value"], item["label"]
    parts = [ScorePart("t:0:1", shared, items[:6]), ScorePart("t:0:2", shared, items[6:])]
    block, bad = score_block("d", parts)
    expected = records_block("d", [{**shared, **item} for item in items])
    assert bad == [] and sorted(block.alerts) == [4]
    for name in SCORE_COLUMNS:
        assert np.array_equal(block.cols[name], expected.cols[name], equal_nan=True), name
    assert np.isnan(block.cols["p_value"][6:]).all() and (block.cols["label"][6:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=8), st.integers(0, 120), st.integers(1, 200),
       st.randoms(use_true_random=False))
def test_the_newest_readings_of_a_device_come_from_the_fewest_newest_documents(sizes, newest, max_values, rnd):
    """Documents of one device (in any order, two metrics each): the chosen ones hold its newest `newest` readings
    (all when 0), no chosen document is older than one left out, and `readings_of` gives exactly those readings."""
    docs, seq = [], 0
    for n in sizes:
        seqs = np.arange(seq, seq + n)
        values = np.column_stack([seqs, -seqs]).astype(float)
        docs.append(reading_bucket("a", seqs, seqs * 10, np.zeros(n, dtype=np.int8), ["x", "y"], values, 1, 0))
        seq += n
    rnd.shuffle(docs)
    heads = [{k: d[k] for k in ("_id", "device_id", "seq_last", "n", "metric_names")} for d in docs]

    groups = newest_buckets(heads, newest, max_values)

    assert len(groups) == 1 and list(groups[0]) == ["a"]
    chosen = [d for d in docs if d["_id"] in groups[0]["a"]]
    left = [d for d in docs if d["_id"] not in groups[0]["a"]]
    assert sum(d["n"] for d in chosen) >= min(newest or seq, seq)
    assert not left or min(d["seq_last"] for d in chosen) > max(d["seq_last"] for d in left)
    readings = readings_of(chosen, newest)
    expected = np.arange(seq)[-newest if newest else 0:]
    assert readings["seq"].tolist() == expected.tolist()
    assert readings["values"][:, 1].tolist() == (-expected).astype(float).tolist()


def test_devices_are_read_in_groups_within_the_value_budget():
    heads = [{"_id": f"{d}:{s}", "device_id": d, "seq_last": s, "n": 10, "metric_names": ["x", "y"]}
             for d in "abcde" for s in (9, 19)]
    groups = newest_buckets(heads, newest=10, max_values=45)  # 20 values per device
    assert groups == [{"a": ["a:19"], "b": ["b:19"]}, {"c": ["c:19"], "d": ["d:19"]}, {"e": ["e:19"]}]
    assert newest_buckets(heads, newest=0, max_values=10) == [{d: [f"{d}:19", f"{d}:9"]} for d in "abcde"]
    shared = newest_buckets(heads, newest=10, max_values=10 ** 6, parts=2)  # 100 values: 50 for each reader
    assert shared == [{"a": ["a:19"], "b": ["b:19"]}, {"c": ["c:19"], "d": ["d:19"]}, {"e": ["e:19"]}]
    assert newest_buckets([dict(h, n=0) for h in heads], newest=10, max_values=45) == [
        {d: [f"{d}:19", f"{d}:9"] for d in "abcde"}]  # documents without readings (not written by the sink)
