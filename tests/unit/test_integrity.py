"""Signed wire records, device tokens, the signing key file, and the rule for adopting a global model."""
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from models.integrity import (AGGREGATOR_ISSUER, device_token, global_model_verdict, load_or_create_key,
                              sign_record, verify_record, wire_form)

KEY = bytes(range(32))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10)
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("signature", "schema")),
                       json_values, max_size=6), st.data())
def test_any_change_to_a_signed_record_is_caught(fields, data):
    record = sign_record({"schema": "flead.snapshot/1", **fields}, KEY)
    assert verify_record(record, KEY) is None
    assert verify_record(dict(reversed(list(record.items()))), KEY) is None   # field order does not matter
    assert "bad signature" in verify_record(record, bytes(32))
    name = data.draw(st.sampled_from(sorted(set(record) - {"signature"})))
    altered = {**record, name: [record[name]]}
    assert "bad signature" in verify_record(altered, KEY)


def test_unsigned_and_malformed_signatures_are_named():
    assert verify_record({"schema": "x"}, KEY) == "unsigned: no 'signature' field"
    assert "expected 'hmac-sha256:" in verify_record({"schema": "x", "signature": 5}, KEY)
    snapshot = sign_record({"schema": "flead.snapshot/1", "version": 3}, KEY)
    as_model = {**snapshot, "schema": "flead.global-model/1"}   # a snapshot cannot pass for a global model
    assert "bad signature" in verify_record(as_model, KEY)
    with pytest.raises(ValueError, match="schema"):
        sign_record({"version": 1}, KEY)


def test_stored_documents_verify_in_their_wire_form():
    record = sign_record({"schema": "flead.snapshot/1", "device_id": "a", "version": 2}, KEY)
    stored = {k: v for k, v in record.items() if k != "schema"} | {"_id": "a:2"}
    assert verify_record(wire_form(stored, "flead.snapshot/1"), KEY) is None


def test_key_file_is_created_once_private(tmp_path):
    path = tmp_path / "state" / "integrity_key"
    key = load_or_create_key(path)
    assert len(key) == 32 and load_or_create_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.write_text("not hex")
    with pytest.raises(ValueError, match="not a hex signing key"):
        load_or_create_key(path)


def test_device_tokens_are_per_device():
    assert device_token(KEY, "a") != device_token(KEY, "b")
    assert device_token(KEY, "a") == device_token(KEY, "a") != device_token(bytes(32), "a")


def model(version, previous=None, issuer=AGGREGATOR_ISSUER, key=KEY):
    return sign_record({"schema": "flead.global-model/1", "version": version,
                        "previous_version": version - 1 if previous is None else previous, "issuer": issuer,
                        "weights": "AAAA"}, key)


def test_adoption_rule():
    """Issue 14.2: a forged global model with version 1000 is not adopted, and real later versions still are."""
    verdict = lambda record, held=3, known=3: global_model_verdict(record, KEY, held, known, max_version_gap=10)
    assert verdict(model(4)).adopt
    forged_unsigned = {k: v for k, v in model(1000).items() if k != "signature"}
    assert "unsigned" in verdict(forged_unsigned).reason
    assert "bad signature" in verdict(model(1000, key=bytes(32))).reason
    assert "ahead of the newest version seen" in verdict(model(1000)).reason   # even signed with the key
    assert "issuer" in verdict(model(4, issuer="someone")).reason
    assert "previous_version" in verdict(model(4, previous=1)).reason
    assert "not newer" in verdict(model(3)).reason and "not newer" in verdict(model(2)).reason
    assert verdict(model(8), known=3).adopt                  # a few missed messages: fine
    assert verdict(model(1), held=0, known=None).adopt       # a fresh consumer takes the first model it sees
    # after refusing v1000 the consumer still adopts the aggregator's next real version
    assert not verdict(model(1000)).adopt and verdict(model(4)).adopt


def test_a_record_verifies_after_a_store_drops_nulls_empties_and_the_sign_of_zero():
    record = sign_record({"schema": "flead.global-model/1", "dp_epsilon": None, "x": -0.0, "participants": [],
                          "nested": {"a": None, "b": [None, -0.0], "c": {}}}, KEY)
    stored = {"schema": "flead.global-model/1", "x": 0.0, "nested": {"b": [None, 0.0]},
              "signature": record["signature"]}
    assert verify_record(stored, KEY) is None
