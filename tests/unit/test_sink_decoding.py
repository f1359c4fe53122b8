"""The sink's decoding (storage.sink.decode_streams, what its decoding processes run), without servers: any split of
a flush's messages gives the same blocks, one per device, and every bad message or record its own refusal."""
import json

import numpy as np

from storage.buckets import SCORE_COLUMNS
from storage.sink import decode_streams
from telemetry.schema import Reading, encode_batch, encode_scores

from fakes import KafkaMessage

SHARED = ("device_id", "model_version", "global_version", "scored_at")


def _messages(device, first, n):
    readings = [Reading(device, s, 1_700_000_000_000 + s * 1000, {"a": float(s), "b": None}, s % 2)
                for s in range(first, first + n)]
    scores = [{"seq": s, "ts": 1_700_000_000_000 + s * 1000, "score": 0.5 + (s == first), "threshold": 1.0,
               "is_anomaly": s == first, "p_value": 0.5, "incident_id": f"{device}:{s}" if s == first else None,
               "top_metrics": [{"metric": "a", "share": 1.0}], "label": s % 2} for s in range(first, first + n)]
    return encode_batch(device, readings), encode_scores(device, 2, 1, 9, scores)


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
    whole = decode_streams(telemetry, scores)
    assert len(whole.readings) == 2 and len(whole.scores) == 2 and whole.refused == [] and whole.telemetry_invalid == 0
    readings, blocks = _by_device(whole)
    assert readings["d1"][2] == list(range(48)) and readings["d1"][3] == [s % 2 for s in range(48)]
    assert readings["d1"][1][0] == [0.0, -7.0]  # null -> nan
    assert blocks["d1"][0]["seq"] == list(range(48)) and blocks["d1"][1] == [0, 16, 32]  # alert rows
    # what two decoding processes return, each its share of the devices, merged by the sink
    d1 = decode_streams(telemetry[0::2], scores[0::2])
    d2 = decode_streams(telemetry[1::2], scores[1::2])
    assert _by_device(d1)[0] | _by_device(d2)[0] == readings and _by_device(d1)[1] | _by_device(d2)[1] == blocks


def test_bad_messages_and_records_each_get_a_refusal_with_their_position():
    telemetry, scores = _flush()
    telemetry.append((b"d1", b"{not json"))
    telemetry.append((b"other-key", telemetry[0][1]))
    record = json.loads(scores[1][1])
    record["scores"][3]["score"] = "high"
    scores[1] = (scores[1][0], json.dumps(record).encode())
    scores.append(("scores:0:99", b"[1, 2]"))
    decoded = decode_streams(telemetry, scores)
    assert decoded.telemetry_invalid == 2
    refused = {r.letter_id: r for r in decoded.refused}
    assert set(refused) == {"scores:0:1:3", "scores:0:99"}
    assert "score" in refused["scores:0:1:3"].reason and refused["scores:0:1:3"].device_id == "d2"
    assert "not a JSON object" in refused["scores:0:99"].reason and refused["scores:0:99"].raw == "[1, 2]"
    _, blocks = _by_device(decoded)
    assert 3 not in blocks["d2"][0]["seq"] and len(blocks["d2"][0]["seq"]) == 31


def test_a_decoding_process_that_dies_is_replaced_and_the_batch_decoded_again():
    """Killed (out of memory, an operator): the sink starts new decoding processes and decodes the same messages,
    counted, instead of failing the batch; the result equals decoding in this process."""
    import os
    import signal

    from config import load_config
    from storage.sink import MongoSink

    cfg = load_config(env={"FLEAD_KAFKA_BOOTSTRAP": "127.0.0.1:1", "FLEAD_SINK_DECODE_PROCESSES": "2"})
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
