"""`storage.rollups`: per group and bucket, the sums and maxima of what was stored, split over generations."""
import math
from collections import defaultdict

import numpy as np
from hypothesis import given, settings, strategies as st

from storage.rollups import FLEET, Level, RollupAccumulator, bucket_starts, merged
from storage.schemas import check_document

records = st.lists(st.fixed_dictionaries({
    "device_id": st.sampled_from(["a", "b"]), "ts": st.integers(-10**7, 10**7), "generation": st.integers(1, 3),
    "score": st.floats(0, 1e6), "threshold": st.one_of(st.none(), st.floats(0, 1e6)), "is_anomaly": st.booleans()}),
    max_size=60)
LEVELS = [Level("score_rollups", "scores", True, 600_000), Level("fleet_rollups", "scores", False, 1000)]


def _columns(recs):
    return {"ts": np.array([r["ts"] for r in recs], dtype=np.int64),
            "score": np.array([r["score"] for r in recs]),
            "threshold": np.array([math.nan if r["threshold"] is None else r["threshold"] for r in recs]),
            "is_anomaly": np.array([r["is_anomaly"] for r in recs], dtype=np.uint8)}


@settings(max_examples=200, deadline=None)
@given(records)
def test_partials_of_every_generation_add_up_to_the_records(recs):
    partials = []
    for generation in (1, 2, 3):  # what each generation stored, rolled up on its own
        acc = RollupAccumulator(LEVELS)
        for device in ("a", "b"):
            mine = [r for r in recs if r["generation"] == generation and r["device_id"] == device]
            if mine:
                acc.add_scores(device, _columns(mine))
        for key, docs in acc.documents(generation, stored_at=0).items():
            partials += [(key, d) for d in docs]
    for key, level in (("score_rollups", LEVELS[0]), ("fleet_rollups", LEVELS[1])):
        groups = defaultdict(list)
        for k, doc in partials:
            if k == key:
                check_document(key, doc)
                groups[(doc.get("device_id", FLEET), doc["ts"])].append(doc)
        assert len({d["_id"] for docs in groups.values() for d in docs}) == sum(map(len, groups.values()))
        assert sum(d["n"] for docs in groups.values() for d in docs) == len(recs)
        for (group, bucket), docs in groups.items():
            mine = [r for r in recs if (not level.per_device or r["device_id"] == group)
                    and bucket <= r["ts"] < bucket + level.bucket_ms]
            total = merged(docs, "scores")
            assert bucket % level.bucket_ms == 0 and total["n"] == len(mine)
            assert total["anomalies"] == sum(r["is_anomaly"] for r in mine)
            assert math.isclose(total["score_sum"], sum(r["score"] for r in mine), rel_tol=1e-9, abs_tol=1e-6)
            assert total["score_max"] == max(r["score"] for r in mine)
            assert total["anomaly_score_max"] == max((r["score"] for r in mine if r["is_anomaly"]), default=None)
            assert total["threshold_max"] == max((r["threshold"] for r in mine if r["threshold"] is not None),
                                                 default=None)


def test_metric_rollups_skip_missing_values():
    acc = RollupAccumulator([Level("metric_rollups", "readings", True, 100)])
    acc.add_readings("d", np.array([0, 50, 120]), ["a", "b"], np.array([[1.0, np.nan], [3.0, np.nan], [5.0, 7.0]]))
    docs = {d["ts"]: d for d in acc.documents(4, stored_at=1)["metric_rollups"]}
    assert docs[0]["n"] == 2 and docs[0]["metrics"] == [{"name": "a", "n": 2, "sum": 4.0, "ts": 0, "device_id": "d"}]
    assert [m["name"] for m in docs[100]["metrics"]] == ["a", "b"]
    for doc in docs.values():
        check_document("metric_rollups", doc)


def test_timestamps_whose_bucket_overflows_are_left_out_not_a_crash():
    acc = RollupAccumulator(LEVELS)
    acc.add_scores("d", _columns([{"ts": -(2**63 - 1), "score": 1.0, "threshold": 1.0, "is_anomaly": False},
                                  {"ts": 5, "score": 2.0, "threshold": 1.0, "is_anomaly": True}]))
    docs = acc.documents(1, stored_at=0)
    assert acc.skipped == 1 and sum(d["n"] for d in docs["fleet_rollups"]) == 1


def test_buckets_start_at_the_floor_also_before_1970():
    assert bucket_starts(np.array([-1, 0, 599_999, 600_000]), 600_000).tolist() == [-600_000, 0, 0, 600_000]
