"""Producer throughput: `telemetry.producer.produce` beside a raw confluent-kafka loop sending the same bytes.

    .venv/bin/python bench/produce.py [--quick] --json OUT

Starts its own broker (orchestration.stack, in a temporary state directory on free ports) unless
FLEAD_KAFKA_BOOTSTRAP names one. Replays the ASD test set (12 devices, 19 metrics) as single-reading messages and as
batch messages; the raw loop pre-encodes the same messages outside the clock, so it is the floor of what any
Python producer pays for Kafka itself, measured in the same run on the same broker.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)

from config import load_config  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from telemetry.producer import produce, producer_config  # noqa: E402
from telemetry.readers import open_reader  # noqa: E402
from telemetry.schema import encode_batch, encode_reading  # noqa: E402
from models.integrity import sign_device_message, signing_key  # noqa: E402

BATCH = 100
TARGET_READINGS_PER_S = 100_000
WARMUP_MESSAGES = 200


def encoded_messages(readings, batch: int, key: bytes) -> list[tuple[str, bytes, int]]:
    """(key, value, readings in it) of each message `produce` would send for file-ordered readings (signed)."""
    if batch == 1:
        return [(r.device_id, sign_device_message(encode_reading(r), key, r.device_id), 1) for r in readings]
    out, group = [], []
    for r in readings:
        if group and (r.device_id != group[0].device_id or len(group) == batch):
            out.append((group[0].device_id, sign_device_message(encode_batch(group[0].device_id, group), key,
                                                                group[0].device_id), len(group)))
            group = []
        group.append(r)
    out.append((group[0].device_id, sign_device_message(encode_batch(group[0].device_id, group), key,
                                                        group[0].device_id), len(group)))
    return out


def warmed_producer(config: dict, topic: str, messages: list[tuple[str, bytes, int]]):
    """A Producer that has its idempotent producer id, metadata and connections, so the clock measures sending."""
    from confluent_kafka import Producer

    producer = Producer(config)
    for key, value, _ in messages[:WARMUP_MESSAGES]:
        producer.produce(topic, value, key=key)
    if producer.flush(60):
        raise RuntimeError(f"warm-up messages not delivered to {config['bootstrap.servers']}")
    return producer


def raw_loop(producer, topic: str, messages: list[tuple[str, bytes, int]]) -> dict:
    """The floor: produce pre-encoded bytes with confluent-kafka, counting deliveries, then flush."""
    delivered = [0]

    def on_delivery(err, msg):
        if err is None:
            delivered[0] += 1

    began = time.perf_counter()
    for i, (key, value, _) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 1024 == 0:
            producer.poll(0)
    producer.flush(60)
    seconds = time.perf_counter() - began
    if delivered[0] != len(messages):
        raise RuntimeError(f"raw loop: {len(messages) - delivered[0]} messages not delivered")
    return row("raw confluent-kafka loop (pre-encoded)", len(messages), sum(n for _, _, n in messages), seconds)


def flead_produce(producer, topic: str, readings: list, batch: int, key: bytes) -> dict:
    result = produce(readings, topic, {}, key=key, batch=batch, producer=producer)
    if result.failed:
        raise RuntimeError(f"produce: {result.failed} failed: {result.errors[:3]}")
    return row("telemetry.producer.produce (encodes, signs)", result.messages, result.readings, result.seconds)


def row(name: str, messages: int, readings: int, seconds: float) -> dict:
    return {"name": name, "messages": messages, "readings": readings, "seconds": round(seconds, 3),
            "messages_per_s": round(messages / seconds), "readings_per_s": round(readings / seconds)}


def reported_config(config: dict) -> dict:
    """The producer settings a report shows: plain values (not the logger object), without the broker's address."""
    return {k: v for k, v in config.items()
            if k != "bootstrap.servers" and isinstance(v, (str, int, float, bool))}


def run(cfg, quick: bool) -> dict:
    topic = cfg.kafka.topics.telemetry
    config = producer_config(cfg)
    readings = list(open_reader("asd", cfg.data_dir / "asd/test.csv.gz"))
    if not quick:
        readings = readings * 3  # the same messages again; seq repeats, which Kafka does not care about
    rows, key = [], signing_key(cfg)
    for batch in (1, BATCH):
        messages = encoded_messages(readings, batch, key)
        floor = raw_loop(warmed_producer(config, topic, messages), topic, messages)
        ours = flead_produce(warmed_producer(config, topic, messages), topic, readings, batch, key)
        for r in (floor, ours):
            r["batch"] = batch
            rows.append(r)
    batched_floor, batched = rows[2], rows[3]
    return {
        "headline": {"name": f"producer throughput, batch messages of {BATCH} readings",
                     "value": batched["readings_per_s"], "unit": "readings/s",
                     "floor": batched_floor["readings_per_s"]},
        "target_readings_per_s": TARGET_READINGS_PER_S,
        "rows": rows,
        "readings_per_run": len(readings),
        "config": reported_config(config),
        "cpus": os.cpu_count(),
    }


def print_table(report: dict) -> None:
    print(f"{'batch':>5}  {'what':<40} {'messages/s':>12} {'readings/s':>12} {'seconds':>8}")
    for r in report["rows"]:
        print(f"{r['batch']:>5}  {r['name']:<40} {r['messages_per_s']:>12,} {r['readings_per_s']:>12,} "
              f"{r['seconds']:>8.2f}")
    h = report["headline"]
    print(f"headline: {h['name']}: {h['value']:,} {h['unit']} (raw floor {h['floor']:,}; "
          f"target {report['target_readings_per_s']:,})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one pass over the ASD test set instead of three")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-"))
    env = {**os.environ, "FLEAD_STATE_DIR": str(state_dir)}
    if not env.get("FLEAD_KAFKA_BOOTSTRAP"):
        env |= {"FLEAD_KAFKA_PORT": str(processes.free_port()),
                "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port())}
    cfg = load_config(env=env)
    try:
        if cfg.kafka_embedded:
            stack.start_kafka(cfg)
        stack.ensure_topics(cfg)
        report = run(cfg, args.quick)
    finally:
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)
    print_table(report)
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
