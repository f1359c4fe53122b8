"""Read any of the project's topics (`flead consume`): tail, count, decode, pretty-print.

The tool reads every partition directly (no consumer group, nothing committed), so it never disturbs the
stream job's group and can be run any number of times.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator

from telemetry.schema import InvalidMessage, decode_message

POLL_S = 0.2
MAX_SHOWN_METRICS = 8
MAX_SHOWN_CHARS = 80


def resolve_topic(cfg, name: str) -> str:
    """A topic's real name from its config key (``telemetry``, ``dead_letters`` or ``dead-letters``), else ``name``."""
    key = name.replace("-", "_")
    topics = cfg.kafka.topics
    return topics[key] if key in topics else name


def iter_messages(bootstrap: str, topic: str, *, from_beginning: bool = False, timeout_s: float | None = None,
                  max_messages: int | None = None, config: dict | None = None) -> Iterator:
    """confluent_kafka Messages of every partition of ``topic``, from the start or only new ones.

    Stops after ``max_messages``, or when no message arrived for ``timeout_s`` seconds (None: never).
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"flead-consume-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": False, **(config or {})})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise RuntimeError(f"topic {topic!r}: {metadata.error.str()}")
        offset = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, offset) for p in sorted(metadata.partitions)])
        count, last_seen = 0, time.monotonic()
        while max_messages is None or count < max_messages:
            msg = consumer.poll(POLL_S)
            if msg is None:
                if timeout_s is not None and time.monotonic() - last_seen >= timeout_s:
                    return
                continue
            if msg.error() is not None:
                raise RuntimeError(f"topic {topic!r}: {msg.error().str()}")
            count, last_seen = count + 1, time.monotonic()
            yield msg
    finally:
        consumer.close()


def _iso_ms(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _shorten(value):
    """Long strings (weights in base64) replaced by their length, recursively."""
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        return f"<{len(value):,} chars>"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    return value


def format_message(msg, telemetry: bool) -> list[str]:
    """Human-readable lines for one message: telemetry decoded reading by reading, anything else as short JSON."""
    head = f"{msg.topic()}[{msg.partition()}]@{msg.offset()} key={(msg.key() or b'').decode(errors='replace')}"
    if telemetry:
        try:
            readings = decode_message(msg.value())
        except InvalidMessage as exc:
            return [f"{head} INVALID: {exc.reason}"]
        lines = []
        for r in readings:
            shown = " ".join(f"{k}={v:g}" for k, v in list(r.metrics.items())[:MAX_SHOWN_METRICS])
            more = f" (+{len(r.metrics) - MAX_SHOWN_METRICS} more)" if len(r.metrics) > MAX_SHOWN_METRICS else ""
            label = "" if r.label is None else f" label={r.label}"
            lines.append(f"{head} {r.device_id} seq={r.seq} {_iso_ms(r.ts)}{label} {shown}{more}")
        return lines
    try:
        value = json.loads(msg.value())
    except ValueError:
        return [f"{head} {msg.value()[:MAX_SHOWN_CHARS]!r}"]
    return [f"{head} {json.dumps(_shorten(value), ensure_ascii=False)}"]


def consume(cfg, topic_name: str, *, from_beginning: bool = False, count_only: bool = False,
            max_messages: int | None = None, timeout_s: float | None = None, raw_json: bool = False,
            out=print) -> dict:
    """Tail (or read from the start) one topic, printing each message (or only counting); returns the counts."""
    topic = resolve_topic(cfg, topic_name)
    telemetry = topic == cfg.kafka.topics.telemetry
    counts = {"topic": topic, "messages": 0, "readings": 0, "invalid": 0}
    try:
        for msg in iter_messages(cfg.kafka_bootstrap, topic, from_beginning=from_beginning, timeout_s=timeout_s,
                                 max_messages=max_messages):
            counts["messages"] += 1
            if telemetry:
                try:
                    counts["readings"] += len(decode_message(msg.value()))
                except InvalidMessage:
                    counts["invalid"] += 1
            if count_only:
                continue
            if raw_json:
                out(msg.value().decode("utf-8", errors="replace"))
            else:
                for line in format_message(msg, telemetry):
                    out(line)
    except KeyboardInterrupt:
        pass
    return counts
