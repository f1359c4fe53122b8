"""Replay into the real broker and read it back: every reading exactly once, in order per device."""
import pytest

from models.integrity import device_message_problem, signing_key
from telemetry.consumer import consume, iter_messages
from telemetry.producer import produce, producer_config
from telemetry.readers import open_reader
from telemetry.schema import decode_message

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("batch", [1, 50])
def test_asd_test_set_replayed_at_full_speed_arrives_exactly_once_in_order(cfg, batch):
    reader = open_reader("asd", cfg.data_dir / "asd/test.csv.gz")
    expected = {}
    for r in reader:
        expected.setdefault(r.device_id, []).append(r)
    topic = cfg.kafka.topics.telemetry
    result = produce(reader, topic, producer_config(cfg), key=signing_key(cfg), batch=batch)
    assert result.failed == 0, result.errors
    assert result.readings == result.delivered_readings == 12 * 4320

    received, partition_of = {}, {}
    for msg in iter_messages(cfg.kafka_bootstrap, topic, from_beginning=True, max_messages=result.messages,
                             timeout_s=30):
        readings = decode_message(msg.value())
        assert {r.device_id for r in readings} == {msg.key().decode()}
        assert device_message_problem(msg.value(), signing_key(cfg), msg.key().decode()) is None
        assert partition_of.setdefault(msg.key(), msg.partition()) == msg.partition()  # one device, one partition
        for r in readings:
            received.setdefault(r.device_id, []).append(r)
    assert received.keys() == expected.keys()
    for device, readings in expected.items():
        assert received[device] == readings, device  # same readings, same order, none twice

    counts = consume(cfg, "telemetry", from_beginning=True, count_only=True, timeout_s=2)
    assert counts == {"topic": topic, "messages": result.messages, "readings": 12 * 4320, "invalid": 0}


def test_wrong_bootstrap_fails_fast_with_a_clear_error(cfg):
    config = producer_config(cfg, **{"bootstrap.servers": "127.0.0.1:1"})
    with pytest.raises(ConnectionError, match="no Kafka broker answers at 127.0.0.1:1"):
        produce([], cfg.kafka.topics.telemetry, config, key=None)


def test_flead_produce_and_consume_commands(cfg, capsys):
    from orchestration.cli import build_parser

    args = build_parser().parse_args(["produce", "--format", "netload", "--order", "time", "--batch", "7"])
    assert args.func(args, cfg) == 0
    args = build_parser().parse_args(["consume", "telemetry", "--from-beginning", "--count", "--timeout", "2"])
    assert args.func(args, cfg) == 0
    out = capsys.readouterr().out
    assert '"readings": 2016' in out and '"invalid": 0' in out
