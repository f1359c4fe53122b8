"""A round's snapshots read from the snapshots topic by the Spark partitions (`aggregation.snapshot_source: kafka`).

The stream job publishes every weight snapshot to `kafka.topics.snapshots` (the sink then stores it in
`local_models`, the record and history). Reading the round's window from MongoDB costs a scan of the whole
collection on the embedded FerretDB (~4 s of its CPU per 10,000 snapshots, whatever the filter), reading it from the
topic ~0.3 s. The window on the topic is a range of offsets per Kafka partition:

- it starts where the previous round's ended (its history document, ``snapshot_offsets``), and in the first round
  ever at the log's start when the log still starts at offset 0;
- it ends at the high watermarks taken when the round starts: a snapshot appended after that goes to the next round,
  each exactly once, whatever the clocks say.

When the previous round left no offsets (it read MongoDB, or another topic), or retention deleted records the
window needs, the round reads MongoDB instead (`aggregate_job.read_window`) and records the high watermarks it took
before that read, so the next round reads the topic. The round's cut-off is taken after the high watermarks, so a
later round that reads MongoDB (created after the cut-off) never reads a snapshot this one read from the topic. At
the switch from MongoDB to the topic, a snapshot sent in the milliseconds between the watermarks and the MongoDB read
could count in both rounds (as its device's newest, once each).

The driver reads the window once, while Spark starts, and splits it among the partitions (`read_split_snapshots`,
`aggregation.snapshot_read` ``driver``), or each Spark partition reads the whole window and keeps its own
(``executors``). Either way a partition checks the snapshots of its own devices (`owner`: CRC-32 of the
``device_id`` in the message, not the Kafka key, which producers may leave empty or forge), so a device's snapshots
all meet in one partition, as the per-device choice needs, and the same one whoever reads. A message that is not a
JSON object with a string ``device_id`` is skipped and counted (the sink stores it as a dead letter); a message
repeated byte for byte (an at-least-once redelivery) is kept once. Copies of one ``(device_id, version)`` that
differ all go on to the checks, so a forged copy sent ahead of a device's genuine snapshot cannot hide it; among the
copies that pass, the first counts (`spark_jobs.snapshots.choose_per_device`), as MongoDB's ``_id`` keeps it.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Iterable

import orjson

OFFSETS_FIELD = "snapshot_offsets"


@dataclass(frozen=True)
class TopicWindow:
    """The offsets ``[start, end)`` of each Kafka partition of ``topic`` that a round reads."""

    topic: str
    ranges: tuple[tuple[int, int, int], ...]  # (partition, start, end)

    @property
    def n_messages(self) -> int:
        """How many offsets the window spans (messages, and any transaction markers among them)."""
        return sum(end - start for _, start, end in self.ranges)


def end_offsets(topic: str, watermarks: dict[int, tuple[int, int]]) -> dict:
    """What a round's history keeps (``snapshot_offsets``): the topic and, per partition, where the next round
    starts (the high watermarks the round took before reading). No nested arrays: FerretDB v1 refuses them."""
    return {"topic": topic,
            "offsets": [{"partition": p, "offset": high} for p, (_, high) in sorted(watermarks.items())]}


def window_ranges(topic: str, watermarks: dict[int, tuple[int, int]], previous_end: dict | None,
                  first_round: bool) -> TopicWindow | None:
    """The round's window on ``topic`` from each partition's (low, high) watermarks and the previous round's
    ``snapshot_offsets``; None when the topic cannot give the whole window (the round then reads MongoDB): no
    previous offsets after the first round, offsets of another topic, or records the window needs already deleted
    (a start below the partition's low watermark), or a topic made anew (a start beyond its end).

    >>> window_ranges("t", {0: (0, 5)}, None, first_round=True)
    TopicWindow(topic='t', ranges=((0, 0, 5),))
    >>> window_ranges("t", {0: (3, 9)}, end_offsets("t", {0: (0, 4)}), first_round=False)
    TopicWindow(topic='t', ranges=((0, 4, 9),))
    >>> window_ranges("t", {0: (5, 9)}, end_offsets("t", {0: (0, 4)}), first_round=False) is None
    True
    """
    if previous_end is None and not first_round:
        return None
    if previous_end is not None and previous_end.get("topic") != topic:
        return None
    starts = {int(o["partition"]): int(o["offset"]) for o in (previous_end or {}).get("offsets", [])}
    ranges = []
    for partition, (low, high) in sorted(watermarks.items()):
        start = starts.get(partition, 0)  # a partition added since the previous round starts at its beginning
        if not low <= start <= high:  # deleted by retention, or the topic was made anew
            return None
        ranges.append((partition, start, high))
    return TopicWindow(topic, tuple(ranges))


def owner(device_id: str, parts: int) -> int:
    """The Spark partition (of ``parts``) that checks ``device_id``'s snapshots: the same in every process.

    >>> owner("omi-1", 4) == owner("omi-1", 4), 0 <= owner("omi-1", 4) < 4
    (True, True)
    """
    return zlib.crc32(device_id.encode("utf-8", "surrogatepass")) % parts


def split_snapshots(values: Iterable[bytes], parts: int, only: int | None = None) -> tuple[list[list[dict]], int]:
    """The window's message values (in offset order) as the snapshots of each of ``parts`` partitions (`owner`;
    with ``only``, that partition's alone, the others left empty), and how many values were not a JSON object
    with a string ``device_id``."""
    split: list[list[dict]] = [[] for _ in range(parts)]
    seen: list[set[bytes]] = [set() for _ in range(parts)]
    unreadable = 0
    for value in values:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            doc = None
        device_id = doc.get("device_id") if isinstance(doc, dict) else None
        if not isinstance(device_id, str):
            unreadable += 1
            continue
        index = owner(device_id, parts)
        if (only is None or index == only) and value not in seen[index]:
            seen[index].add(value)
            split[index].append(doc)
    return split, unreadable


def own_snapshots(values: Iterable[bytes], index: int, parts: int) -> tuple[list[dict], int]:
    """Partition ``index``'s snapshots among the window's message values (`split_snapshots`), and how many values
    were unreadable (counted by partition 0 only, so each once)."""
    split, unreadable = split_snapshots(values, parts, only=index)
    return split[index], unreadable if index == 0 else 0


# ---------------------------------------------------------------- I/O: the broker

def _consumer(cfg):
    from confluent_kafka import Consumer

    return Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": "flead-aggregator",
                     "enable.auto.commit": False, "enable.auto.offset.store": False,
                     "fetch.max.bytes": cfg.aggregation.snapshot_fetch_bytes,
                     "max.partition.fetch.bytes": cfg.aggregation.snapshot_fetch_bytes})


def topic_watermarks(cfg) -> dict[int, tuple[int, int]]:
    """(low, high) watermark of each partition of the snapshots topic, now."""
    from confluent_kafka import TopicPartition

    topic, timeout = cfg.kafka.topics.snapshots, cfg.aggregation.snapshot_read_timeout_s
    consumer = _consumer(cfg)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise RuntimeError(f"topic {topic} at {cfg.kafka_bootstrap}: "
                               f"{metadata.error if metadata is not None else 'not found'}")
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
                for p in sorted(metadata.partitions)}
    finally:
        consumer.close()


def send_acknowledged(cfg, topic: str, messages: list[tuple[bytes | None, bytes]], timeout_s: float,
                      **producer_settings) -> None:
    """Send (key, value) messages to ``topic``; raises `KafkaException` unless the broker acknowledged them all
    within ``timeout_s``."""
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "message.max.bytes": cfg.kafka.max_message_bytes,
                         **producer_settings})
    for key, value in messages:
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, _msg: err and errors.append(str(err)))
    if producer.flush(timeout_s) or errors:
        raise KafkaException(f"{topic} at {cfg.kafka_bootstrap}: "
                             f"{errors[0] if errors else f'not all messages acknowledged within {timeout_s:g} s'}")


def publish_snapshot(cfg, record: dict) -> None:
    """Send one signed snapshot to the snapshots topic, keyed by its device (`send_acknowledged` within
    `aggregation.snapshot_read_timeout_s`)."""
    send_acknowledged(cfg, cfg.kafka.topics.snapshots, [(str(record["device_id"]).encode(), orjson.dumps(record))],
                      cfg.aggregation.snapshot_read_timeout_s)


def window_values(cfg, window: TopicWindow) -> Iterable[bytes]:
    """The message values in ``window``, partition by partition in offset order (executor side). Raises when a
    partition's range is not read within `aggregation.snapshot_read_timeout_s` of its last message."""
    from confluent_kafka import KafkaError, TopicPartition

    timeout = cfg.aggregation.snapshot_read_timeout_s
    consumer = _consumer(cfg)
    try:
        for partition, start, end in window.ranges:
            if end <= start:
                continue
            consumer.assign([TopicPartition(window.topic, partition, start)])
            position, waited_since = start, time.monotonic()
            while position < end:
                messages = consumer.consume(cfg.aggregation.snapshot_fetch_messages, 1.0)
                for message in messages:
                    if message.error() is not None:
                        if message.error().code() == KafkaError._PARTITION_EOF:
                            continue
                        raise RuntimeError(f"reading {window.topic}[{partition}]: {message.error()}")
                    if message.offset() < end:
                        yield message.value()
                    position = max(position, message.offset() + 1)
                if messages:
                    waited_since = time.monotonic()
                else:  # offsets without a message (transaction markers) at the end: the position moves past them
                    position = max(position, consumer.position([TopicPartition(window.topic, partition)])[0].offset)
                    if position < end and time.monotonic() - waited_since > timeout:
                        raise RuntimeError(f"reading {window.topic}[{partition}] offsets {start}..{end}: stuck at "
                                           f"{position} for {timeout:g} s (aggregation.snapshot_read_timeout_s)")
    finally:
        consumer.close()


def read_own_snapshots(cfg, window: TopicWindow, index: int, parts: int) -> tuple[list[dict], int]:
    """Executor side: partition ``index``'s snapshots in the window (`own_snapshots` over `window_values`)."""
    return own_snapshots(window_values(cfg, window), index, parts)


def read_split_snapshots(cfg, window: TopicWindow, parts: int) -> tuple[list[list[dict]], int]:
    """Driver side: the window read once and split among ``parts`` partitions (`split_snapshots`)."""
    return split_snapshots(window_values(cfg, window), parts)
