"""`storage.mongo.score_rollups`: per device and bucket, the sums and maxima of the score records in it."""
import math

from hypothesis import given, settings, strategies as st

from storage.mongo import score_rollups
from storage.schemas import check_document

records = st.lists(st.fixed_dictionaries({
    "device_id": st.sampled_from(["a", "b"]), "ts": st.integers(0, 10**7),
    "score": st.floats(0, 1e6), "threshold": st.one_of(st.none(), st.floats(0, 1e6)), "is_anomaly": st.booleans()}),
    max_size=60)


@settings(max_examples=200, deadline=None)
@given(records, st.sampled_from([1, 1000, 600_000]))
def test_rollups_add_up_to_the_records(recs, bucket_ms):
    rollups = score_rollups(recs, bucket_ms)
    assert sum(r["n"] for r in rollups) == len(recs)
    assert sum(r["anomalies"] for r in rollups) == sum(r["is_anomaly"] for r in recs)
    assert math.isclose(sum(r["score_sum"] for r in rollups), sum(r["score"] for r in recs), abs_tol=1e-6)
    for r in rollups:
        mine = [x for x in recs if x["device_id"] == r["device_id"] and r["ts"] <= x["ts"] < r["ts"] + bucket_ms]
        assert r["ts"] % bucket_ms == 0 and len(mine) == r["n"]
        assert r["score_max"] == max(x["score"] for x in mine)
        assert r.get("anomaly_score_max") == max((x["score"] for x in mine if x["is_anomaly"]), default=None)
        assert r.get("threshold_max") == max((x["threshold"] for x in mine if x["threshold"] is not None),
                                             default=None)
        check_document("score_rollups", r)
