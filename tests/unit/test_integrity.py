"""Signed wire records, device tokens, the signing key file, and the rule for adopting a global model."""
import json
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from models.integrity import (AGGREGATOR_ISSUER, device_message_problem, device_token, global_model_verdict,
                              load_or_create_key, sign_device_message, sign_message, sign_record, verify_message,
                              verify_record, wire_form)

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


messages = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "signature"), json_values,
                           min_size=1, max_size=6).map(lambda d: json.dumps(d, separators=(",", ":")).encode())


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_any_byte_changed_in_a_signed_message_is_refused(message, data):
    signed = sign_message(message, KEY)
    assert verify_message(signed, KEY) is None
    assert json.loads(signed) == {**json.loads(message), "signature": json.loads(signed)["signature"]}
    at = data.draw(st.integers(0, len(signed) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != signed[at]))
    changed = signed[:at] + bytes([byte]) + signed[at + 1:]
    assert verify_message(changed, KEY) is not None
    assert verify_message(signed[:at] + signed[at + 1:], KEY) is not None  # a byte dropped
    assert "bad signature" in verify_message(signed, bytes(32))


@settings(max_examples=100, deadline=None)
@given(messages, messages)
def test_a_signature_moved_to_another_message_is_refused(one, other):
    signed, target = sign_message(one, KEY), sign_message(other, KEY)
    moved = target[:target.rindex(b',"signature":"')] + signed[signed.rindex(b',"signature":"'):]
    assert (verify_message(moved, KEY) is None) == (one == other)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_messages_without_the_field_are_unsigned(message):
    assert verify_message(message, KEY) == "unsigned: no 'signature' field"


def test_signature_fields_of_another_shape_are_refused():
    signed = sign_message(b'{"device_id":"a","seq":1}', KEY)
    for bad in (signed[:-2] + b'0"}',                                   # one hex digit too many
                signed.replace(b"hmac-sha256:", b"hmac-sha1:"),
                signed[:-1] + b',"x":1}',                               # not the last field
                signed[:-66] + signed[-66:-2].upper() + b'"}',         # hex digits are lower case
                signed + b" "):
        assert verify_message(bad, KEY).startswith("bad signature"), bad
    with pytest.raises(ValueError, match="not yet signed"):
        sign_message(signed, KEY)
    for not_an_object in (b"[1]", b"{}", b"", b'{"a":1} '):
        with pytest.raises(ValueError, match="one JSON object"):
            sign_message(not_an_object, KEY)


def test_telemetry_is_signed_with_the_device_token_and_unsigned_is_accepted_only_when_allowed():
    message = b'{"schema":"flead.telemetry/1","device_id":"a","seq":1}'
    signed = sign_device_message(message, KEY, "a")
    assert signed == sign_message(message, device_token(KEY, "a").encode())  # what a device holding its token sends
    assert device_message_problem(signed, KEY, "a") is None
    assert "bad signature" in device_message_problem(signed, KEY, "b")       # another device's token
    assert "bad signature" in device_message_problem(sign_message(message, KEY), KEY, "a")  # the deployment key
    assert device_message_problem(message, KEY, "a") == "unsigned: no 'signature' field"
    assert device_message_problem(message, KEY, "a", required=False) is None
    assert "bad signature" in device_message_problem(signed[:-3] + b'00"}', KEY, "a", required=False)


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
