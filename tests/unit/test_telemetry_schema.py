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


def columns_message(**columns) -> str:
    good = {"metrics": ["a", "b"], "seq": [1, 2], "ts": [5, 6], "values": [[0.5, 1], [None, 2]]}
    return json.dumps({"schema": SCHEMA, "device_id": "d1", "columns": {**good, **columns}})


INVALID_COLUMNS = [
    ("not an object", json.dumps({"schema": SCHEMA, "device_id": "d1", "columns": [1]}),
     "columns: expected an object, got list"),
    ("beside readings", json.dumps({"schema": SCHEMA, "device_id": "d1", "columns": {}, "readings": []}),
     "'columns' beside 'readings' or 'metrics'"),
    ("no metrics", columns_message(metrics=None), "columns.metrics: expected a list, got NoneType"),
    ("empty metric name", columns_message(metrics=["a", ""]), "columns.metrics: metric name '' must have 1 to"),
    ("metric named twice", columns_message(metrics=["a", "a"]), "columns.metrics: a metric is named twice"),
    ("missing ts", columns_message(ts=None).replace('"ts": null, ', ""), "missing field 'columns.ts'"),
    ("ts short", columns_message(ts=[5]), "columns.ts: 1 items, expected 2"),
    ("seq as text", columns_message(seq=[1, "2"]), "columns.seq: expected int items, got str '2'"),
    ("seq repeats", columns_message(seq=[3, 3]), "columns.seq[1]: 3 does not increase (previous 3)"),
    ("negative seq", columns_message(seq=[-1, 2]), "columns.seq: -1 is out of range"),
    ("ts out of range", columns_message(ts=[5, MAX_TS_MS + 1]), "columns.ts: 4102444800001 is not between"),
    ("bad label", columns_message(label=[0, 2]), "columns.label: expected 0, 1 or null, got 2"),
    ("bool label", columns_message(label=[0, True]), "columns.label: expected int or NoneType items, got bool"),
    ("row too short", columns_message(values=[[0.5, 1], [2]]), "columns.values[1]: 1 values for 2 metrics"),
    ("row not a list", columns_message(values=[[0.5, 1], {"a": 1}]), "columns.values: expected list items, got dict"),
    ("text value", columns_message(values=[[0.5, 1], [2, "3"]]),
     "columns.values[1][1] (b): expected a number, got str"),
    ("bool value", columns_message(values=[[True, 1], [2, 3]]),
     "columns.values[0][0] (a): expected a number, got bool"),
    ("huge value", columns_message(values=[[0.5, 1e300], [2, 3]]), "columns.values[0][1] (b): 1e+300 is too large"),
    ("huge integer", columns_message(values=[[0.5, 1], [2, 10**400]]), "columns.values[1][1] (b): "),
]


@pytest.mark.parametrize("decode", [decode_message, decode_columns])
@pytest.mark.parametrize("raw, reason", [(raw, reason) for _, raw, reason in INVALID + INVALID_COLUMNS],
                         ids=[name for name, _, _ in INVALID + INVALID_COLUMNS])
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
def uniform_batch_items(draw):
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
    return items


def uniform_batches():
    return uniform_batch_items().map(lambda items: json.dumps({"schema": SCHEMA, "device_id": "d1",
                                                               "readings": items}))


def as_columns(items: list[dict]) -> str:
    """The readings of a ``readings`` batch (`uniform_batch_items`) as a batch of columns."""
    names = list(dict.fromkeys(name for item in items for name in item["metrics"]))
    return json.dumps({"schema": SCHEMA, "device_id": "d1", "columns": {
        "metrics": names, "seq": [item["seq"] for item in items], "ts": [item["ts"] for item in items],
        "values": [[item["metrics"].get(name) for name in names] for item in items],
        "label": [item["label"] for item in items]}})


@settings(max_examples=400, deadline=None)
@given(uniform_batch_items())
def test_a_batch_as_columns_decodes_as_the_same_readings(items):
    """Valid or spoiled, a batch sent as columns is refused when its readings would be, else decodes to them."""
    rows, columns = json.dumps({"schema": SCHEMA, "device_id": "d1", "readings": items}), as_columns(items)
    try:
        expected = decode_columns(rows)
    except InvalidMessage:
        for decode in (decode_columns, decode_message):
            with pytest.raises(InvalidMessage) as info:
                decode(columns)
            assert info.value.device_id == "d1" and info.value.reason.startswith("columns.")
        return
    got = decode_columns(columns)
    assert got[:2] + got[3:] == expected[:2] + expected[3:]
    assert got.X.dtype == np.float64 and np.array_equal(got.X, expected.X, equal_nan=True)
    assert decode_message(columns) == decode_message(rows)


def test_a_device_batch_travels_as_columns_in_half_the_bytes():
    names = [f"m{j:02d}" for j in range(19)]
    batch = [Reading("omi-1", i, 1_706_659_200_000 + 60_000 * i, {n: 0.01 * (i + j) for j, n in enumerate(names)}, 0)
             for i in range(16)]
    raw = encode_batch("omi-1", batch)
    assert "columns" in json.loads(raw) and decode_message(raw) == batch
    as_rows = json.dumps({"schema": SCHEMA, "device_id": "omi-1", "readings": [
        {"seq": r.seq, "ts": r.ts, "metrics": r.metrics, "label": r.label} for r in batch]}, separators=(",", ":"))
    assert len(raw) < 0.55 * len(as_rows)
    mixed = [batch[0], Reading("omi-1", 1, batch[1].ts, {"m00": 1.0})]  # another metric set: a list of readings
    raw = encode_batch("omi-1", mixed)
    assert "readings" in json.loads(raw) and decode_message(raw) == mixed


def test_infinite_values_in_columns_are_missing():
    raw = columns_message(values=[[float("inf"), 1], [2, None]]).replace("Infinity", "1e400")  # 1e400: inf
    [first, second] = decode_message(raw)
    assert math.isnan(first.metrics["a"]) and math.isnan(second.metrics["b"]) and first.metrics["b"] == 1.0


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
