"""The telemetry message contract: round trips, and a clear reason for every way a message can be wrong."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.integrity import sign_message
from telemetry.schema import (DEAD_LETTER_SCHEMA, MAX_ABS_VALUE, MAX_DEAD_LETTER_RAW_CHARS, MAX_TS_MS, MIN_TS_MS, SCHEMA, InvalidMessage, Reading,
                              dead_letter, decode_columns, decode_message, decode_scores, encode_batch,
                              encode_reading, encode_scores)

device_ids = st.text(min_size=1, max_size=200).filter(lambda s: s.strip())
metric_names = st.text(min_size=1, max_size=30)
values = st.floats(min_value=-MAX_ABS_VALUE, max_value=MAX_ABS_VALUE, allow_nan=False)
metrics = st.dictionaries(metric_names, values, min_size=1, max_size=20)
labels = st.sampled_from([None, 0, 1])
int64 = st.integers(min_value=0, max_value=2**63 - 1)
event_times = st.integers(min_value=MIN_TS_MS, max_value=MAX_TS_MS)


@st.composite
def readings(draw, device_id=None):
    return Reading(device_id or draw(device_ids), draw(int64), draw(event_times), draw(metrics), draw(labels))


@settings(max_examples=200, deadline=None)
@given(readings())
def test_single_reading_round_trips(r):
    assert decode_message(encode_reading(r)) == [r]


@settings(max_examples=100, deadline=None)
@given(device_ids, st.lists(st.tuples(st.integers(0, 5), event_times, metrics, labels), min_size=1, max_size=10))
def test_batch_round_trips_in_order(device_id, steps):
    seq, batch = 0, []
    for gap, ts, m, label in steps:
        seq += gap
        batch.append(Reading(device_id, seq, ts, m, label))
        seq += 1
    assert decode_message(encode_batch(device_id, batch)) == batch


def test_missing_values_decode_to_nan():
    raw = b'{"schema": "flead.telemetry/1", "device_id": "d", "seq": 0, "ts": 5, ' \
          b'"metrics": {"a": null, "b": NaN, "c": Infinity, "d": -Infinity, "e": 1e400, "f": 2}}'
    [r] = decode_message(raw)
    assert all(math.isnan(r.metrics[k]) for k in "abcde")
    assert r.metrics["f"] == 2.0 and type(r.metrics["f"]) is float


def test_nan_is_encoded_as_null_which_is_valid_json():
    raw = encode_reading(Reading("d", 0, 1, {"a": math.nan, "b": math.inf}))
    assert json.loads(raw)["metrics"] == {"a": None, "b": None}
    assert math.isnan(decode_message(raw)[0].metrics["a"])


def test_contract_example_decodes():
    [r] = decode_message('{"schema": "flead.telemetry/1", "device_id": "omi-1", "seq": 17, "ts": 1706659200000, '
                         '"metrics": {"m00": 0.56, "m01": 0.5}, "label": 0, "future_field": true}')
    assert r == Reading("omi-1", 17, 1706659200000, {"m00": 0.56, "m01": 0.5}, 0)


def message(**fields):
    base = {"schema": SCHEMA, "device_id": "omi-1", "seq": 1, "ts": 1000, "metrics": {"m00": 0.5}}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def batch(*items):
    return json.dumps({"schema": SCHEMA, "device_id": "omi-1", "readings": list(items)})


GOOD = {"seq": 1, "ts": 1000, "metrics": {"m00": 0.5}}

INVALID = [
    ("tombstone", None, "no value (a tombstone record)"),
    ("not json", b"{nope", "not JSON: "),
    ("invalid utf-8", b'{"a": "\xff"}', "not JSON: "),
    ("empty", b"", "not JSON: "),
    ("array", b"[1, 2]", "not a JSON object: got list"),
    ("string", b'"hello"', "not a JSON object: got str"),
    ("no schema", message(schema=...), "missing field 'schema'"),
    ("unknown schema", message(schema="flead.telemetry/2"), "unknown schema 'flead.telemetry/2'"),
    ("no device", message(device_id=...), "missing field 'device_id'"),
    ("device not str", message(device_id=7), "device_id: expected a string, got int"),
    ("device empty", message(device_id=""), "device_id: empty"),
    ("device blank", message(device_id="   "), "device_id: empty"),
    ("device too long", message(device_id="x" * 201), "device_id: 201 characters, at most 200"),
    ("no seq", message(seq=...), "missing field 'seq'"),
    ("seq str", message(seq="1"), "seq: expected an integer, got str"),
    ("seq bool", message(seq=True), "seq: expected an integer, got bool"),
    ("seq negative", message(seq=-1), "seq: -1 is out of range"),
    ("seq huge", message(seq=2**64), "seq: "),
    ("no ts", message(ts=...), "missing field 'ts'"),
    ("ts float", message(ts=1000.5), "ts: expected integer epoch milliseconds, got float"),
    ("ts str", message(ts="2024-01-01"), "ts: expected integer epoch milliseconds, got str"),
    ("ts before 1970", message(ts=-(2**63 - 1)), "ts: -9223372036854775807 is not between 1970-01-01 and 2100"),
    ("ts in year 3000", message(ts=32_503_680_000_000), "ts: 32503680000000 is not between 1970-01-01 and 2100"),
    ("no metrics", message(metrics=...), "missing field 'metrics'"),
    ("metrics list", message(metrics=[1]), "metrics: expected an object, got list"),
    ("metrics empty", message(metrics={}), "metrics: empty"),
    ("too many metrics", message(metrics={f"m{i}": 1 for i in range(1001)}), "metrics: 1001 metrics, at most 1000"),
    ("metric str", message(metrics={"m03": "0.5"}), "metrics.m03: expected a number, got str"),
    ("metric bool", message(metrics={"m03": True}), "metrics.m03: expected a number, got bool"),
    ("metric object", message(metrics={"m03": {}}), "metrics.m03: expected a number, got dict"),
    ("metric too large", message(metrics={"m03": 1e301}), "metrics.m03: 1e+301 is too large"),
    ("metric whose square overflows", message(metrics={"m03": -1e160}), "metrics.m03: -1e+160 is too large"),
    ("metric int too large", message(metrics={"m03": 10**301}), "metrics.m03: "),
    ("metric name empty", message(metrics={"": 1}), "metrics: metric name '' must have 1 to 200 characters"),
    ("label 2", message(label=2), "label: expected 0, 1 or null, got 2"),
    ("label str", message(label="1"), "label: expected 0, 1 or null, got '1'"),
    ("both", message(readings=[GOOD]), "both 'metrics' and 'readings'"),
    ("readings not list", batch().replace("[]", "{}"), "readings: expected a list, got dict"),
    ("empty batch", batch(), "readings: empty batch"),
    ("batch item not object", batch(GOOD, 3), "readings[1]: expected an object, got int"),
    ("batch item no ts", batch({"seq": 1, "metrics": {"a": 1}}), "missing field 'readings[0].ts'"),
    ("batch item bad metric", batch(GOOD, {**GOOD, "seq": 2, "metrics": {"a": "x"}}),
     "readings[1].metrics.a: expected a number, got str"),
    ("batch seq repeats", batch(GOOD, GOOD), "readings[1].seq: 1 does not increase (previous 1)"),
    ("batch too big", batch(*({**GOOD, "seq": i} for i in range(10_001))), "readings: 10001 readings, at most"),
]


@pytest.mark.parametrize("decode", [decode_message, decode_columns])
@pytest.mark.parametrize("raw, reason", [(raw, reason) for _, raw, reason in INVALID],
                         ids=[name for name, _, _ in INVALID])
def test_invalid_message_gives_its_reason(decode, raw, reason):
    with pytest.raises(InvalidMessage) as info:
        decode(raw)
    assert info.value.reason.startswith(reason), info.value.reason
    assert str(info.value) == info.value.reason


def reference_columns(raw):
    """`decode_columns` spelled out on top of `decode_message`: what the fast path must agree with."""
    readings = decode_message(raw)
    names = list(dict.fromkeys(n for r in readings for n in r.metrics))
    X = np.array([[r.metrics.get(n, math.nan) for n in names] for r in readings], dtype=np.float64)
    return (readings[0].device_id, tuple(names), X, [r.seq for r in readings], [r.ts for r in readings],
            [r.label for r in readings])


# Batches whose readings share one metric list (decode_columns' fast path); some with one value spoiled.
good_value = st.one_of(st.floats(), st.integers(-2**70, 2**70), st.none())
bad_value = st.sampled_from([True, "0.5", [1], {}, 1e301, -10**301, 10**400])
bad_int = st.sampled_from([-1, True, 1.5, "3", None, 2**63, -2**63, 2**64])


@st.composite
def uniform_batches(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4, unique=True))
    items = [{"seq": i, "ts": draw(st.integers(-2**63 + 1, 2**63 - 1)),
              "metrics": {n: draw(good_value) for n in names}, "label": draw(st.sampled_from([None, 0, 1]))}
             for i in range(draw(st.integers(1, 6)))]
    spoil = draw(st.sampled_from(["nothing", "metric", "seq", "ts", "label", "order", "name"]))
    item = draw(st.sampled_from(items))
    if spoil == "metric":
        item["metrics"][draw(st.sampled_from(names))] = draw(bad_value)
    elif spoil in ("seq", "ts"):
        item[spoil] = draw(bad_int)
    elif spoil == "label":
        item["label"] = draw(st.sampled_from([2, -1, True, "1", 0.0]))
    elif spoil == "order":  # the same metrics in another order: the slow path, same result
        item["metrics"] = dict(reversed(item["metrics"].items()))
    elif spoil == "name":
        item["metrics"][""] = 1.0
    return json.dumps({"schema": SCHEMA, "device_id": "d1", "readings": items})


@settings(max_examples=400, deadline=None)
@given(st.one_of(uniform_batches(), st.builds(lambda r: encode_reading(r), readings())))
def test_decode_columns_agrees_with_decode_message(raw):
    try:
        expected = reference_columns(raw)
    except InvalidMessage as exc:
        with pytest.raises(InvalidMessage) as info:
            decode_columns(raw)
        assert info.value.reason == exc.reason and info.value.device_id == exc.device_id
        return
    got = decode_columns(raw)
    assert (got.device_id, got.names, got.seqs, got.ts, got.labels) == expected[:2] + expected[3:]
    assert got.X.dtype == np.float64 and np.array_equal(got.X, expected[2], equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(device_ids, st.lists(st.tuples(event_times, metrics, labels), min_size=1, max_size=5), st.booleans())
def test_the_signature_field_is_ignored_by_every_decoder(device_id, steps, uniform):
    batch = [Reading(device_id, seq, ts, m if not uniform else steps[0][1], label)
             for seq, (ts, m, label) in enumerate(steps)]  # uniform: the fast path of decode_columns
    raw = encode_batch(device_id, batch)
    signed = sign_message(raw, bytes(32))
    assert decode_message(signed) == decode_message(raw) == batch
    got, expected = decode_columns(signed), decode_columns(raw)
    assert got[:2] + got[3:] == expected[:2] + expected[3:] and np.array_equal(got.X, expected.X, equal_nan=True)


def test_decode_columns_takes_the_union_of_differing_metric_sets():
    got = decode_columns(batch({**GOOD, "metrics": {"a": 1, "b": 2}}, {**GOOD, "seq": 2, "metrics": {"c": 3, "a": 4}}))
    assert got.names == ("a", "b", "c")
    assert np.array_equal(got.X, [[1, 2, math.nan], [4, math.nan, 3]], equal_nan=True)


def test_score_batches_decode_to_complete_records():
    raw = encode_scores("omi-1", 4, 2, 99, [{"seq": 1, "score": 0.5}, {"seq": 2, "score": float("nan")}])
    assert decode_scores(raw) == [
        {"device_id": "omi-1", "model_version": 4, "global_version": 2, "scored_at": 99, "seq": 1, "score": 0.5},
        {"device_id": "omi-1", "model_version": 4, "global_version": 2, "scored_at": 99, "seq": 2, "score": None}]
    single = {"device_id": "omi-1", "seq": 3, "score": 0.1}
    assert decode_scores(json.dumps(single)) == [single]
    assert decode_scores(sign_message(raw, bytes(32))) == decode_scores(raw)  # the signature is no record field
    assert decode_scores(sign_message(json.dumps(single).encode(), bytes(32))) == [single]


@pytest.mark.parametrize("raw, reason", [
    (b"[1]", "not a JSON object"), (b'{"scores": []}', "a batch of scores with schema None"),
    (b'{"schema": "flead.scores/1", "scores": [1]}', "scores: expected a list of objects")])
def test_bad_score_batches_give_a_reason(raw, reason):
    with pytest.raises(InvalidMessage, match=reason):
        decode_scores(raw)


def test_invalid_message_names_the_device_when_readable():
    with pytest.raises(InvalidMessage) as info:
        decode_message(message(ts=...))
    assert info.value.device_id == "omi-1"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_invalid_message(raw):
    try:
        decode_message(raw)
    except InvalidMessage:
        pass


def test_encode_batch_refuses_other_devices_and_empty_batches():
    with pytest.raises(ValueError, match="reading of 'b' in a batch of 'a'"):
        encode_batch("a", [Reading("b", 0, 0, {"x": 1.0})])
    with pytest.raises(ValueError, match="no readings"):
        encode_batch("a", [])


def test_dead_letter_follows_the_contract():
    raw = b'{"schema": "flead.telemetry/1", "device_id": "x"' + b"\xff" + b"y" * 20_000
    record = json.loads(dead_letter(raw, "not JSON: ...", "flead.telemetry", device_id="x", at=123))
    assert record["schema"] == DEAD_LETTER_SCHEMA
    assert record["source"] == "flead.telemetry" and record["reason"] == "not JSON: ..."
    assert record["device_id"] == "x" and record["at"] == 123
    assert len(record["raw"]) == MAX_DEAD_LETTER_RAW_CHARS and "\ufffd" in record["raw"]
    assert json.loads(dead_letter(None, "r", "s"))["device_id"] is None


def test_a_message_larger_than_the_limit_is_refused_unread():
    huge = json.dumps({"schema": SCHEMA, "device_id": "d", "seq": 1, "ts": 5, "metrics": {"m": 1},
                       "padding": "x" * (8 * 1024 * 1024)}).encode()
    for decode in (decode_message, decode_columns):
        with pytest.raises(InvalidMessage, match=r"message of 8,388,[0-9]+ bytes, at most 8,388,608"):
            decode(huge)
