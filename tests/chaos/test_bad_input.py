"""The bad-input corpus (issue 14): hostile or broken telemetry mixed into a live-like stream, every outcome asserted.

Two devices send normal readings with current event times (the job runs with its live timestamp window, 7 days);
between them come the corpus' messages: a device's own broken messages (signed with its token, as a device with a
bug would send them) and forged ones (unsigned, or signed with the wrong key or token, or altered), whose high
seqs would make the good readings after them count as duplicates if the job took them. Each must end exactly as the table says: a dead letter with its reason,
or scored (missing values imputed, an absurd value flagged without blinding its metric), or dropped as a duplicate
(counted, not dead-lettered). Every good reading is scored exactly once. The table is printed and kept in
artifacts/bad-input-table.md (docs/reliability.md quotes it).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from confluent_kafka import Producer

from config import PROJECT_ROOT
from models.integrity import sign_device_message, signing_key
from stream_support import read_topic, run_bounded
from telemetry.producer import produce, producer_config
from telemetry.schema import SCHEMA, Reading, encode_batch, encode_reading

pytestmark = [pytest.mark.chaos, pytest.mark.flink]

GOOD = ("good-0", "good-1")
METRICS = [f"m{i:02d}" for i in range(6)]
WARM = 400        # readings per device before the corpus (past the detector's warm-up)
AFTER = 64        # readings per device after it
DAY_MS = 86_400_000
BIG = 9_000_000   # bytes: below the broker's limit (10 MB), above the stream's (8 MiB)


def reading(device: str, seq: int, now: int, values=None) -> Reading:
    rng = np.random.default_rng(seq)
    values = values if values is not None else rng.normal(0.5, 0.05, size=len(METRICS))
    return Reading(device, seq, now - (WARM + AFTER - seq) * 1000, dict(zip(METRICS, map(float, values))), 0)


def message(device="bad-1", seq=1, ts=None, metrics=None, **extra) -> bytes:
    body = {"schema": SCHEMA, "device_id": device, "seq": seq, "ts": int(time.time() * 1000) if ts is None else ts,
            "metrics": metrics if metrics is not None else {"m00": 0.5}, **extra}
    return json.dumps(body).encode()


def columns(device="bad-1", **fields) -> bytes:
    """A batch as columns (two readings of m00, now) with `fields` of its columns replaced."""
    now = int(time.time() * 1000)
    body = {"metrics": ["m00"], "seq": [1, 2], "ts": [now, now + 1], "values": [[0.5], [0.6]], **fields}
    return json.dumps({"schema": SCHEMA, "device_id": device, "columns": body}).encode()


def corpus(now: int, key: bytes) -> list[tuple[str, str, bytes | None, str, str]]:
    """(input, Kafka key, value, expected outcome, reason or check); `key`: the deployment's signing key."""
    def sent_by(device: str, value: bytes) -> bytes:  # signed with the device's token, as the device sends it
        return sign_device_message(value, key, device)

    many = [{"seq": i, "ts": now, "metrics": {"m00": 0.5}} for i in range(10_001)]
    dup = encode_batch("good-0", [reading("good-0", s, now) for s in range(16, 32)])
    ahead = 10**12  # a forged reading this far ahead would make every later genuine one a duplicate
    bad = "bad signature: the message was altered or signed with another key"
    return [
        ("malformed JSON", "bad-1", sent_by("bad-1", b'{"schema": "flead.telemetry/1", "device_id": }'), "dead letter",
         "not JSON"),
        ("binary bytes", "bad-1", bytes(range(256)), "dead letter", "unsigned: no 'signature' field"),
        ("a string for a number", "bad-1", sent_by("bad-1", message(metrics={"m00": "high"})), "dead letter",
         "metrics.m00: expected a number, got str"),
        ("a float seq", "bad-1", sent_by("bad-1", message(seq=1.5)), "dead letter",
         "seq: expected an integer, got float"),
        ("1e301", "bad-1", sent_by("bad-1", message(metrics={"m00": 1e301})), "dead letter", "is too large"),
        ("1e200 (its square overflows float64)", "bad-1", sent_by("bad-1", message(metrics={"m00": 1e200})),
         "dead letter", "is too large (|value| > 1e+100)"),
        ("ts in year 1", "bad-1", sent_by("bad-1", message(ts=-62_135_596_800_000)), "dead letter",
         "is not between 1970-01-01 and 2100-01-01"),
        ("ts in year 3000", "bad-1", sent_by("bad-1", message(ts=32_503_680_000_000)), "dead letter",
         "is not between 1970-01-01 and 2100-01-01"),
        ("ts -(2^63-1)", "bad-1", sent_by("bad-1", message(ts=-(2**63 - 1))), "dead letter",
         "is not between 1970-01-01"),
        ("ts 2^63-1", "bad-1", sent_by("bad-1", message(ts=2**63 - 1)), "dead letter", "is not between 1970-01-01"),
        ("ts a month ago", "bad-1", sent_by("bad-1", message(ts=now - 30 * DAY_MS)), "dead letter",
         "an event time more than stream.timestamp_window_s = 604800 s from now"),
        ("a 9 MB message", "bad-1", sent_by("bad-1", message(padding="x" * BIG)), "dead letter",
         "bytes, at most 8,388,608"),
        ("5,000 metrics", "bad-1", sent_by("bad-1", message(metrics={f"k{i}": 1.0 for i in range(5000)})),
         "dead letter", "metrics: 5000 metrics, at most 1000"),
        ("10,001 readings", "bad-1",
         sent_by("bad-1", json.dumps({"schema": SCHEMA, "device_id": "bad-1", "readings": many}).encode()),
         "dead letter", "readings: 10001 readings, at most 10000 per message"),
        ("columns: a string for a number", "bad-1", sent_by("bad-1", columns(values=[[0.5], ["high"]])),
         "dead letter", "columns.values[1][0] (m00): expected a number, got str"),
        ("columns: a row one value short", "bad-1", sent_by("bad-1", columns(values=[[0.5], []])), "dead letter",
         "columns.values[1]: 0 values for 1 metrics"),
        ("columns: seq going back", "bad-1", sent_by("bad-1", columns(seq=[2, 1])), "dead letter",
         "columns.seq[1]: 1 does not increase (previous 2)"),
        ("columns beside readings", "bad-1",
         sent_by("bad-1", json.dumps({"schema": SCHEMA, "device_id": "bad-1", "columns": {}, "readings": []}).encode()),
         "dead letter", "'columns' beside 'readings' or 'metrics'"),
        ("another device's readings under its own key", "good-0", sent_by("good-0", message(device="good-1")),
         "dead letter", "device_id 'good-1' under the Kafka key 'good-0'"),
        ("an empty record (tombstone)", "bad-1", None, "dead letter", "no value (a tombstone record)"),
        ("an unknown schema", "bad-1", sent_by("bad-1", json.dumps({"schema": "x/1", "device_id": "bad-1"}).encode()),
         "dead letter", "unknown schema 'x/1'"),
        ("forged: unsigned, seq 10^12", "good-0", message("good-0", ahead), "dead letter",
         "unsigned: no 'signature' field"),
        ("forged: signed with another key", "good-1", sign_device_message(message("good-1", ahead), bytes(32), "good-1"),
         "dead letter", bad),
        ("forged: another device's token", "good-0", sent_by("bad-1", message("good-0", ahead)), "dead letter", bad),
        ("forged: altered after signing", "good-1",
         sent_by("good-1", message("good-1", 7)).replace(b'"seq": 7', f'"seq": {ahead}'.encode()), "dead letter", bad),
        ("forged: a made-up device, unsigned", "ghost-1", message("ghost-1"), "dead letter",
         "unsigned: no 'signature' field"),
        ("a duplicate of 16 scored readings", "good-0", sent_by("good-0", dup), "dropped", "scored once"),
        ("NaN and Infinity values", "good-0",
         sent_by("good-0", message("good-0", WARM, reading("good-0", WARM, now).ts,
                                   {m: (math.nan if i == 0 else math.inf if i == 1 else 0.5)
                                    for i, m in enumerate(METRICS)})),
         "scored", "missing values imputed"),
        ("1e20 in one metric", "good-1",
         sent_by("good-1", encode_reading(reading("good-1", WARM, now, [0.5, 0.5, 1e20, 0.5, 0.5, 0.5]))),
         "scored", "flagged, finite score"),
    ]


def test_every_bad_input_gets_its_outcome_and_every_good_reading_is_scored_once(cfg, tmp_path):
    now = int(time.time() * 1000)
    warm = [reading(d, s, now) for s in range(WARM) for d in GOOD]
    after = [reading(d, s, now) for s in range(WARM + 1, WARM + AFTER) for d in GOOD]
    key = signing_key(cfg)
    cases = corpus(now, key)
    assert produce(warm, cfg.kafka.topics.telemetry, producer_config(cfg), key=key, batch=16).failed == 0
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "message.max.bytes": 12_000_000})
    for _, device, value, _, _ in cases:
        producer.produce(cfg.kafka.topics.telemetry, value, key=device.encode())
    assert producer.flush(30) == 0
    assert produce(after, cfg.kafka.topics.telemetry, producer_config(cfg), key=key, batch=16).failed == 0

    run_bounded(tmp_path, env={"FLEAD_STREAM_TIMESTAMP_WINDOW_S": str(7 * 86_400)})

    scores = read_topic(cfg, "scores")
    ids = [(s["device_id"], s["seq"]) for s in scores]
    assert sorted(ids) == sorted({(d, s) for d in GOOD for s in range(WARM + AFTER)})  # each good reading once
    by_id = {(s["device_id"], s["seq"]): s for s in scores}
    imputed = by_id[("good-0", WARM)]
    assert math.isfinite(imputed["score"])
    absurd, later = by_id[("good-1", WARM)], [by_id[("good-1", s)] for s in range(WARM + 8, WARM + AFTER)]
    assert absurd["is_anomaly"] and math.isfinite(absurd["score"]) and absurd["top_metrics"][0]["metric"] == "m02"
    assert np.mean([s["is_anomaly"] for s in later]) < 0.2  # the device still works: no flood of flags after it

    letters = read_topic(cfg, "dead_letters")
    expected = [(name, reason) for name, _, _, outcome, reason in cases if outcome == "dead letter"]
    assert len(letters) == len(expected), [d["reason"] for d in letters]
    unmatched = [d["reason"] for d in letters]
    rows = []
    for name, reason in expected:
        found = next((r for r in unmatched if reason in r), None)
        assert found is not None, (name, reason, unmatched)
        unmatched.remove(found)
        rows.append((name, "dead letter", found[:90]))
    rows += [(name, outcome, check) for name, _, _, outcome, check in cases if outcome != "dead letter"]
    table = "\n".join(["| input | outcome | reason / check |", "| --- | --- | --- |",
                       *(f"| {n} | {o} | {r.replace('|', '/')} |" for n, o, r in rows)])
    print("\n" + table)
    out = PROJECT_ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "bad-input-table.md").write_text(table + "\n")
