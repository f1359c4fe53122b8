"""Schema checks that guard every MongoDB write (client-side where the server has no validators)."""
import pytest

from storage.schemas import SCHEMAS, SchemaViolation, check_document

GOOD_SCORE = {"device_id": "omi-1", "seq": 3, "ts": 1_700_000_000_000, "score": 0.2, "threshold": 0.5,
              "is_anomaly": False, "model_version": 1, "top_metrics": [{"metric": "m00", "share": 0.7}]}


def test_a_valid_score_record_passes():
    check_document("alerts", GOOD_SCORE)


@pytest.mark.parametrize("change, message", [
    ({"seq": -1}, "below the minimum"),
    ({"score": float("nan")}, "not a finite number"),
    ({"is_anomaly": "yes"}, "is_anomaly: expected"),
    ({"device_id": ""}, "empty string"),
    ({"top_metrics": [{"metric": "m00"}]}, "missing required field 'share'"),
    ({"seq": True}, "seq: expected"),
])
def test_violations_name_the_field(change, message):
    with pytest.raises(SchemaViolation, match=message):
        check_document("alerts", {**GOOD_SCORE, **change})


def test_missing_required_field():
    doc = dict(GOOD_SCORE)
    del doc["ts"]
    with pytest.raises(SchemaViolation, match="missing required field 'ts'"):
        check_document("alerts", doc)


def test_every_collection_has_a_schema_and_indexes():
    from storage.schemas import INDEXES

    assert set(SCHEMAS) == set(INDEXES)


def test_field_names_that_mongodb_reads_as_operators_or_paths_are_refused():
    from storage.schemas import check_field_names

    check_field_names({"incident_id": "a:1", "metrics_to_blame": [{"metric": "m", "share": 1.0}]}, "incidents")
    for bad in ({"$where": 1}, {"a.b": 1}, {"ok": [{"$x": 1}]}, {"": 1}):
        with pytest.raises(SchemaViolation, match="not a plain identifier"):
            check_field_names(bad, "incidents")
