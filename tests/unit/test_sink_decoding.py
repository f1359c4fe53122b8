"""The sink's decoding (storage.sink.decode_streams, what its decoding processes run), without servers: any split of
a flush's messages gives the same blocks, one per device, and every bad message or record its own refusal."""
import json

import numpy as np

import pytest

from models.integrity import sign_device_message, sign_message
from storage.buckets import SCORE_COLUMNS
from storage.sink import Trust, decode_streams
from telemetry.schema import Reading, encode_batch, encode_scores

from fakes import KafkaMessage

SHARED = ("device_id", "model_version", "global_version", "scored_at")
KEY = bytes(range(32))
TRUST = Trust(KEY, require_signed_telemetry=True)


def _messages(device, first, n):
    readings = [Reading(device, s, 1_700_000_000_000 + s * 1000, {"a": float(s), "b": None}, s % 2)
                for s in range(first, first + n)]
    scores = [{"seq": s, "ts": 1_700_000_000_000 + s * 1000, "score": 0.5 + (s == first), "threshold": 1.0,
               "is_anomaly": s == first, "p_value": 0.5, "incident_id": f"{device}:{s}" if s == first else None,
               "top_metrics": [{"metric": "a", "share": 1.0}], "label": s % 2} for s in range(first, first + n)]
    return (sign_device_message(encode_batch(device, readings), KEY, device),  # as the device sends it
            sign_message(encode_scores(device, 2, 1, 9, scores), KEY))         # as the stream job does


def _flush():
    telemetry, scores = [], []
    for i, (device, first) in enumerate([("d1", 0), ("d2", 0), ("d1", 16), ("d2", 16), ("d1", 32)]):
        t, s = _messages(device, first, 16)
        telemetry.append((device.encode(), t))
        scores.append((f"scores:0:{i}", s))
    return telemetry, scores


def _by_device(decoded):
    readings = {b.device_id: (list(b.names), np.nan_to_num(b.X, nan=-7.0).tolist(), list(b.seqs), list(b.labels))
                for b in decoded.readings}
    scores = {b.device_id: ({k: b.cols[k].tolist() for k in SCORE_COLUMNS}, sorted(b.alerts)) for b in decoded.scores}
    return readings, scores


def test_one_block_per_device_whatever_the_split():
    telemetry, scores = _flush()
    whole = decode_streams(telemetry, scores, TRUST)
    assert len(whole.readings) == 2 and len(whole.scores) == 2 and whole.refused == [] and whole.telemetry_invalid == 0
    assert whole.telemetry_refused == 0
    readings, blocks = _by_device(whole)
    assert readings["d1"][2] == list(range(48)) and readings["d1"][3] == [s % 2 for s in range(48)]
    assert readings["d1"][1][0] == [0.0, -7.0]  # null -> nan
    assert blocks["d1"][0]["seq"] == list(range(48)) and blocks["d1"][1] == [0, 16, 32]  # alert rows
    # what two decoding processes return, each its share of the devices, merged by the sink
    d1 = decode_streams(telemetry[0::2], scores[0::2], TRUST)
    d2 = decode_streams(telemetry[1::2], scores[1::2], TRUST)
    assert _by_device(d1)[0] | _by_device(d2)[0] == readings and _by_device(d1)[1] | _by_device(d2)[1] == blocks


def test_bad_messages_and_records_each_get_a_refusal_with_their_position():
    telemetry, scores = _flush()
    telemetry.append((b"d1", b"{not json"))
    telemetry.append((b"other-key", telemetry[0][1]))
    record = json.loads(scores[1][1])
    del record["signature"]
    record["scores"][3]["score"] = "high"
    scores[1] = (scores[1][0], sign_message(json.dumps(record).encode(), KEY))
    scores.append(("scores:0:99", b"[1, 2]"))
    scores.append(("scores:0:100", sign_message(b'{"schema": "flead.scores/1", "scores": "none"}', KEY)))
    decoded = decode_streams(telemetry, scores, TRUST)
    assert decoded.telemetry_invalid == 2
    refused = {r.letter_id: r for r in decoded.refused}
    assert set(refused) == {"scores:0:1:3", "scores:0:99", "scores:0:100"}
    assert "score" in refused["scores:0:1:3"].reason and refused["scores:0:1:3"].device_id == "d2"
    assert refused["scores:0:99"].reason == "unsigned: no 'signature' field" and refused["scores:0:99"].raw == "[1, 2]"
    assert refused["scores:0:100"].reason == "scores: expected a list of objects"
    _, blocks = _by_device(decoded)
    assert 3 not in blocks["d2"][0]["seq"] and len(blocks["d2"][0]["seq"]) == 31


def _forged(flush):
    """Copies of the flush's first messages (device d1, seqs 0-15) with other values: unsigned, altered after
    signing, or signed with another key."""
    telemetry, scores = flush
    unsigned_t = telemetry[0][1][:telemetry[0][1].rindex(b',"signature":"')] + b"}"
    unsigned_s = scores[0][1][:scores[0][1].rindex(b',"signature":"')] + b"}"
    return ([(b"d1", unsigned_t.replace(b'"values":[[0.0', b'"values":[[9.0')),
             (b"d1", telemetry[0][1].replace(b'"values":[[0.0', b'"values":[[9.0')),
             (b"d1", sign_device_message(unsigned_t.replace(b'"values":[[0.0', b'"values":[[9.0'), bytes(32), "d1"))],
            [("scores:1:0", unsigned_s.replace(b'"score":1.5', b'"score":0.1')),
             ("scores:1:1", scores[0][1].replace(b'"score":1.5', b'"score":0.1')),
             ("scores:1:2", sign_message(unsigned_s.replace(b'"score":1.5', b'"score":0.1'), bytes(32)))])


def test_forged_messages_are_refused_before_they_can_take_a_readings_place():
    """The sink keeps each (device, seq) once: a forged copy decoded first would make the genuine one a replay."""
    flush = _flush()
    forged_telemetry, forged_scores = _forged(flush)
    assert all(b'"values":[[9.0' in v for _, v in forged_telemetry)
    assert all(b'"score":0.1' in v for _, v in forged_scores)
    decoded = decode_streams(forged_telemetry + flush[0], forged_scores + flush[1], TRUST)
    assert decoded.telemetry_refused == 3 and decoded.telemetry_invalid == 0
    assert [r.reason for r in decoded.refused] == [
        "unsigned: no 'signature' field", "bad signature: the message was altered or signed with another key",
        "bad signature: the message was altered or signed with another key"]
    assert [r.letter_id for r in decoded.refused] == ["scores:1:0", "scores:1:1", "scores:1:2"]
    assert _by_device(decoded) == _by_device(decode_streams(*flush, TRUST))  # only the genuine messages


@pytest.mark.parametrize("required", [True, False])
def test_unsigned_telemetry_is_taken_only_when_signatures_are_not_required(required):
    telemetry, scores = _flush()
    forged_telemetry, _ = _forged((telemetry, scores))
    decoded = decode_streams(forged_telemetry, [], Trust(KEY, required))
    assert decoded.telemetry_refused == (3 if required else 2)  # a bad signature is refused either way
    assert [b.X[0, 0] for b in decoded.readings] == ([] if required else [9.0])


def test_a_decoding_process_that_dies_is_replaced_and_the_batch_decoded_again():
    """Killed (out of memory, an operator): the sink starts new decoding processes and decodes the same messages,
    counted, instead of failing the batch; the result equals decoding in this process."""
    import os
    import signal

    from config import load_config
    from storage.sink import MongoSink

    cfg = load_config(env={"FLEAD_KAFKA_BOOTSTRAP": "127.0.0.1:1", "FLEAD_SINK_DECODE_PROCESSES": "2",
                           "FLEAD_INTEGRITY_KEY": KEY.hex()})
    telemetry, scores = _flush()
    topics = cfg.kafka.topics
    messages = ([KafkaMessage(v, k, topics.telemetry, i) for i, (k, v) in enumerate(telemetry)]
                + [KafkaMessage(v, k.encode(), topics.scores, i) for i, (k, (_, v)) in
                   enumerate(zip([t[0].decode() for t in telemetry], scores))])
    sink = MongoSink(cfg)
    try:
        first = sink.decode(messages)
        for pid in list(sink.decoder._processes):
            os.kill(pid, signal.SIGKILL)
        again = sink.decode(messages)
        assert sink.stats["decoder_restarts"] == 1
        assert sorted(b.device_id for b in again.readings) == sorted(b.device_id for b in first.readings) == ["d1", "d2"]
        assert sum(len(b.seqs) for b in again.readings) == 5 * 16
        assert sorted(b.device_id for b in again.scores) == ["d1", "d2"]
        sink.decode(messages)
        assert sink.stats["decoder_restarts"] == 1   # the new processes work
    finally:
        sink.decoder.shutdown(cancel_futures=True)
        sink.consumer.close()
