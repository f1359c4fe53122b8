"""Schema checks that guard every MongoDB write (client-side where the server has no validators)."""
import pytest

from storage.schemas import SCHEMAS, SchemaViolation, check_document

GOOD_SCORE = {"device_id": "omi-1", "seq": 3, "ts": 1_700_000_000_000, "score": 0.2, "threshold": 0.5,
              "is_anomaly": False, "model_version": 1, "top_metrics": [{"metric": "m00", "share": 0.7}]}


def test_a_valid_score_record_passes():
    check_document("predictions", GOOD_SCORE)


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
        check_document("predictions", {**GOOD_SCORE, **change})


def test_missing_required_field():
    doc = dict(GOOD_SCORE)
    del doc["ts"]
    with pytest.raises(SchemaViolation, match="missing required field 'ts'"):
        check_document("predictions", doc)


def test_every_collection_has_a_schema_and_indexes():
    from storage.schemas import INDEXES

    assert set(SCHEMAS) == set(INDEXES)
