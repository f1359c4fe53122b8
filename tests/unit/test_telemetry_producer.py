"""Producer logic (batching, replay, pacing, delivery accounting) against an in-memory stand-in for Kafka."""
import logging
import time

import pytest

from fakes import Producer as FakeProducer
from models.integrity import device_message_problem
from telemetry.producer import KAFKA_LOG, order_by_time, produce, replay
from telemetry.schema import Reading, decode_message

KEY = bytes(range(32))


def readings(devices=("a", "b"), n=5, step_ms=1000):
    return [Reading(d, i, 1_000_000 + i * step_ms, {"x": float(i)}, 0) for d in devices for i in range(n)]


def decoded(fake):
    """The readings sent, each message checked to be signed with the token of the device it is keyed by."""
    assert all(device_message_problem(value, KEY, key) is None for _, key, value in fake.sent)
    return [r for _, _, value in fake.sent for r in decode_message(value)]


def test_single_reading_messages_keyed_by_device():
    fake, data = FakeProducer(), readings()
    result = produce(data, "t", {}, key=KEY, producer=fake)
    assert [key for _, key, _ in fake.sent] == [r.device_id for r in data]
    assert decoded(fake) == data
    assert (result.readings, result.messages, result.delivered_readings, result.failed) == (10, 10, 10, 0)


def test_batches_hold_one_device_each_and_keep_order():
    fake, data = FakeProducer(), order_by_time(readings(n=7))  # devices interleaved
    result = produce(data, "t", {}, key=KEY, batch=3, producer=fake)
    for _, key, value in fake.sent:
        assert {r.device_id for r in decode_message(value)} == {key}
    for device in "ab":
        assert [r.seq for r in decoded(fake) if r.device_id == device] == list(range(7))
    assert (result.messages, result.delivered_messages, result.delivered_readings) == (6, 6, 14)


def test_without_a_key_messages_go_unsigned():
    fake, data = FakeProducer(), readings()
    produce(data, "t", {}, key=None, batch=5, producer=fake)
    assert [r for _, _, value in fake.sent for r in decode_message(value)] == data
    assert all(device_message_problem(value, KEY, key) == "unsigned: no 'signature' field" for _, key, value in fake.sent)


def test_start_and_limit_select_a_slice():
    fake, data = FakeProducer(), readings()
    produce(data, "t", {}, key=KEY, start=3, limit=4, producer=fake)
    assert decoded(fake) == data[3:7]


def test_loop_continues_seq_and_moves_time_forward():
    data = readings(devices=("a",), n=3, step_ms=500)
    out = list(zip(range(7), replay(data, loop=True)))
    seqs = [r.seq for _, r in out]
    ts = [r.ts for _, r in out]
    assert seqs == list(range(7))
    assert ts == [1_000_000 + 500 * i for i in range(7)]


def test_delivery_errors_are_counted_and_reported():
    lines = []
    result = produce(readings(), "t", {}, key=KEY, producer=FakeProducer(failing={"b"}), progress=lines.append)
    assert result.failed == 5 and result.delivered_readings == 5
    assert result.errors[0] == "MSG_TIMED_OUT: Local: Message timed out"
    assert "5 failed" in lines[-1]


def test_rate_paces_the_replay():
    began = time.monotonic()
    result = produce(readings(n=10), "t", {}, key=KEY, rate=100.0, producer=FakeProducer())
    assert result.readings == 20 and time.monotonic() - began >= 0.18


def test_speedup_follows_event_time_and_sends_stale_partial_batches():
    fake, data = FakeProducer(), readings(devices=("a",), n=3, step_ms=1000)
    began = time.monotonic()
    result = produce(data, "t", {}, key=KEY, speedup=10.0, batch=100, max_batch_delay_s=0.05, producer=fake)
    assert time.monotonic() - began >= 0.19  # 2 s of event time at 10x
    assert result.messages >= 2 and decoded(fake) == data  # partial batches did not wait for 100 readings


def test_interrupt_sends_what_is_buffered():
    def interrupted():
        yield from readings(devices=("a",), n=3)
        raise KeyboardInterrupt

    fake = FakeProducer()
    result = produce(interrupted(), "t", {}, key=KEY, batch=10, producer=fake)
    assert result.interrupted and result.delivered_readings == 3 and len(decoded(fake)) == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="batch must be >= 1"):
        produce([], "t", {}, key=KEY, batch=0, producer=FakeProducer())
    with pytest.raises(ValueError, match="either rate or speedup"):
        produce([], "t", {}, key=KEY, rate=1, speedup=1, producer=FakeProducer())


def test_librdkafka_warnings_it_retries_by_itself_are_not_shown(caplog):
    with caplog.at_level(logging.WARNING, logger=KAFKA_LOG.name):
        KAFKA_LOG.warning("%s [%s] %s", "GETPID", "rdkafka#producer-8", "Failed to acquire idempotence PID from broker "
                          "127.0.0.1:9092/1: Broker: Coordinator load in progress: retrying")
        KAFKA_LOG.warning("%s [%s] %s", "FAIL", "rdkafka#producer-9", "127.0.0.1:1/bootstrap: Connect to "
                          "ipv4#127.0.0.1:1 failed: Connection refused")
    assert [r.getMessage().split()[0] for r in caplog.records] == ["FAIL"]
