"""`flead produce` / `flead consume` argument handling and message formatting (no broker needed)."""
import argparse

from config import load_config
from telemetry.cli import register
from telemetry.consumer import format_message, resolve_topic
from telemetry.schema import Reading, dead_letter, encode_reading

from fakes import KafkaMessage


def message(value, topic="flead.telemetry"):
    return KafkaMessage(value, key=b"omi-1", topic=topic, offset=42)


def parse(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_produce_and_consume_arguments():
    args = parse("produce", "--format", "nsl-kdd", "--path", "x.txt", "--rate", "500", "--batch", "20", "--loop",
                 "--start", "10", "--limit", "99", "--skip-bad", "--non-iid")
    assert (args.format, args.rate, args.batch, args.loop, args.start, args.limit) == ("nsl-kdd", 500, 20, True, 10, 99)
    assert args.skip_bad and args.non_iid and args.speedup is None and args.func.__name__ == "run_produce"
    args = parse("consume", "dead-letters", "--from-beginning", "--count", "--max", "5", "--timeout", "2", "--json")
    assert (args.topic, args.from_beginning, args.count, args.max, args.timeout, args.json) == (
        "dead-letters", True, True, 5, 2.0, True)


def test_topics_resolve_from_config_keys():
    cfg = load_config()
    assert resolve_topic(cfg, "dead-letters") == cfg.kafka.topics.dead_letters
    assert resolve_topic(cfg, "telemetry") == cfg.kafka.topics.telemetry
    assert resolve_topic(cfg, "my.topic") == "my.topic"


def test_format_message_decodes_telemetry_and_shortens_other_json():
    [line] = format_message(message(encode_reading(Reading("omi-1", 3, 1706659200000, {"m00": 0.5}, 1))), True)
    assert line == "flead.telemetry[0]@42 key=omi-1 omi-1 seq=3 2024-01-31T00:00:00.000Z label=1 m00=0.5"
    [line] = format_message(message(b'{"schema": "flead.telemetry/1"}'), True)
    assert line.endswith("INVALID: missing field 'device_id'")
    [line] = format_message(message(b'{"weights": "' + b"A" * 500 + b'"}', topic="snapshots"), False)
    assert line.endswith('{"weights": "<500 chars>"}')
    [line] = format_message(message(dead_letter(b"x", "not JSON", "flead.telemetry", at=1), topic="dl"), False)
    assert '"reason": "not JSON"' in line
