"""The fleet overview's summary documents (storage.summaries) on a real MongoDB server: kept equal to counts of the
collections they summarise as scores and incidents are stored, after a prune, and rebuilt when a writer loads."""
import time

import pytest

from storage.summaries import FLEET_ID, INCIDENTS_ID, rank_devices
from storage.writer import BucketWriter

pytestmark = pytest.mark.integration
DAY_MS = 86_400_000


def _score(device, seq, anomaly=False):
    return {"device_id": device, "seq": seq, "ts": 1_700_000_000_000 + seq * 60_000, "score": 0.5, "threshold": 1.0,
            "is_anomaly": anomaly, "model_version": 1, "global_version": 0, "scored_at": 1_700_000_000_100 + seq}


def _incident(device, start, status, end_seq):
    return {"schema": "flead.incident/1", "incident_id": f"{device}:{start}", "device_id": device, "status": status,
            "start_seq": start, "end_seq": end_seq, "start_ts": 1000 * start, "end_ts": 1000 * end_seq,
            "n_flagged": end_seq - start + 1, "n_readings": end_seq - start + 1, "peak_score": 2.0, "peak_ratio": 2.0,
            "updated_at": 5000 + end_seq}


def _summary(store, _id):
    return store.collection("fleet_summary").find_one({"_id": _id})


def _expected_devices(store):
    totals = {}
    for doc in store.find("daily_rollups"):
        n, a = totals.get(doc["device_id"], (0, 0))
        totals[doc["device_id"]] = (n + doc["n"], a + doc["anomalies"])
    return rank_devices([{"device_id": d, "n": n, "anomalies": a} for d, (n, a) in totals.items()],
                        store.cfg.rollups.summary_devices)


def test_summaries_equal_counts_of_what_is_stored(store):
    store.init()
    store.write_scores([_score("a", s, anomaly=s % 7 == 0) for s in range(50)])
    store.write_scores([_score("b", s, anomaly=s % 5 == 0) for s in range(30)] + [_score("a", 50, True)])
    store.write_incidents([_incident("a", 1, "open", 2), _incident("b", 3, "open", 3), _incident("b", 9, "open", 9)])
    store.write_incidents([_incident("a", 1, "resolved", 4), _incident("b", 9, "open", 8)])  # a late, older state

    fleet = _summary(store, FLEET_ID)
    assert sum(b["n"] for b in fleet["series"]) == store.count_readings() == 81
    assert sum(b["anomalies"] for b in fleet["series"]) == store.collection("alerts").count_documents({})
    assert fleet["devices"] == _expected_devices(store)
    incidents = _summary(store, INCIDENTS_ID)
    assert incidents["open_incidents"] == store.collection("incidents").count_documents({"status": "open"}) == 2
    stored = {d["_id"]: d for d in store.find("incidents")}
    assert [(e["incident_id"], e["status"], e["end_ts"]) for e in incidents["newest"]] == [
        (i, stored[i]["status"], stored[i]["end_ts"]) for i in ("b:9", "b:3", "a:1")]

    assert [d["device_id"] for d in fleet["devices"]] == ["a", "b"]  # 9 anomalous readings, then 6
    for device in ("a", "b"):
        doc = store.collection("device_summary").find_one({"_id": device})
        assert {"device_id": device, "n": doc["n"], "anomalies": doc["anomalies"]} in fleet["devices"]
        assert sum(e["anomalies"] for e in doc["scores"]) == store.collection("alerts").count_documents(
            {"device_id": device}) > 0
        assert sum(e["n"] for e in doc["scores"]) == sum(d["n"] for d in store.find("score_rollups", {"device_id": device}))

    # a crash between a write and its summary: the next writer's load recomputes both from the collections
    devices = store.find("device_summary")
    store.collection("fleet_summary").delete_many({})
    store.collection("device_summary").delete_many({})
    BucketWriter(store).load()
    assert [(d["_id"], d["scores"], d["metrics"]) for d in store.find("device_summary")] == [
        (d["_id"], d["scores"], d["metrics"]) for d in devices]
    assert _summary(store, FLEET_ID)["devices"] == fleet["devices"]
    assert _summary(store, INCIDENTS_ID)["open"] == incidents["open"]


def test_a_prune_of_summarised_documents_rebuilds_the_summaries(store):
    store.init()
    store.write_scores([_score("old", s, anomaly=s == 3) for s in range(10)])
    store.write_incidents([_incident("old", 3, "open", 3)])
    for key in ("daily_rollups", "fleet_rollups", "incidents"):  # stored 100 days ago: past the summary horizon
        store.collection(key).update_many({}, {"$inc": {"stored_at": -100 * DAY_MS}})
    store.write_scores([_score("new", s) for s in range(5)])
    assert _summary(store, INCIDENTS_ID)["open_incidents"] == 1

    deleted = store.prune(now_ms=int(time.time() * 1000))

    assert deleted["incidents"] == 1 and deleted["daily_rollups"] > 0
    assert _summary(store, INCIDENTS_ID)["open_incidents"] == 0 and _summary(store, INCIDENTS_ID)["newest"] == []
    assert _summary(store, FLEET_ID)["devices"] == _expected_devices(store) == [
        {"device_id": "new", "n": 5, "anomalies": 0}]
