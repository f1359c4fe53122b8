"""Replay readings into the telemetry topic (`flead produce`).

Key = device_id, so one device's readings stay on one partition, in order. The producer is idempotent
(``enable.idempotence``): retries neither duplicate nor reorder messages. With ``batch`` > 1 each message carries
up to ``batch`` consecutive readings of ONE device (`telemetry.schema.encode_batch`); a partial batch is sent when it
has waited ``max_batch_delay_s`` (paced replay) or at the end. Each message is signed with its device's token
(`models.integrity.sign_device_message`), derived from the deployment's key: the replay runs where the key is.
Delivery failures are counted and reported, never dropped silently.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from models.integrity import sign_device_message
from telemetry.schema import Reading, encode_batch, encode_reading

MAX_KEPT_ERRORS = 10
FLUSH_TIMEOUT_S = 30.0
CHECK_EVERY_READINGS = 1024  # how often the full-speed loop looks at the clock and serves delivery reports


class _SelfHealing(logging.Filter):
    """Drops librdkafka's warnings about a step it retries by itself, e.g. "Failed to acquire idempotence PID from
    broker ...: Coordinator load in progress: retrying" while a broker that just started loads its state: nothing
    for the user to do, and a failure that lasts is reported by the delivery reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(": retrying")


KAFKA_LOG = logging.getLogger("flead.kafka")
"""Where the producers' librdkafka messages go (served by ``poll``/``flush``)."""
KAFKA_LOG.addFilter(_SelfHealing())


@dataclass
class ProduceResult:
    """What one replay did. ``failed`` counts messages the broker did not acknowledge (reasons in ``errors``)."""

    readings: int = 0
    messages: int = 0
    delivered_messages: int = 0
    delivered_readings: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def readings_per_s(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def record_failure(self, reason: str, messages: int = 1) -> None:
        self.failed += messages
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(reason)


def producer_config(cfg, **overrides) -> dict:
    """librdkafka settings for throughput (linger, compression from ``cfg.ingest``) and safe, ordered delivery."""
    config = {
        "bootstrap.servers": cfg.kafka_bootstrap,
        "enable.idempotence": True,  # acks=all, no duplicates or reordering on retry
        "linger.ms": cfg.ingest.linger_ms,
        "compression.type": cfg.ingest.compression,
        "batch.size": cfg.ingest.kafka_batch_bytes,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "message.max.bytes": cfg.kafka.max_message_bytes,
        "log_level": 4,  # warnings and errors; librdkafka's info lines (e.g. at shutdown) are noise here
        "logger": KAFKA_LOG,
    }
    config.update(overrides)
    return config


def replay(readings: Iterable[Reading], loop: bool = False) -> Iterator[Reading]:
    """The readings once, or forever when ``loop``: each repetition continues every device's seq and shifts ts by
    the span of the data plus one reading interval, so replays never collide with or go back before earlier ones.
    ``readings`` must be re-iterable (a reader or a list) for ``loop``."""
    if not loop:
        yield from readings
        return
    seq_shift: dict[str, int] = {}
    ts_shift = 0
    while True:
        next_seq: dict[str, int] = {}
        last_ts: dict[str, int] = {}
        lo = hi = None
        step = 1
        for r in readings:
            if ts_shift:
                r = Reading(r.device_id, r.seq + seq_shift.get(r.device_id, 0), r.ts + ts_shift, r.metrics, r.label)
            next_seq[r.device_id] = r.seq + 1
            previous = last_ts.get(r.device_id)
            if previous is not None and r.ts > previous:
                step = r.ts - previous
            last_ts[r.device_id] = r.ts
            lo = r.ts if lo is None or r.ts < lo else lo
            hi = r.ts if hi is None or r.ts > hi else hi
            yield r
        if lo is None:
            return
        seq_shift = {**seq_shift, **next_seq}
        ts_shift += hi - lo + step


def order_by_time(readings: Iterable[Reading]) -> list[Reading]:
    """All readings sorted by event time (stable, so each device keeps its order); devices interleave as they
    would live. Holds everything in memory."""
    return sorted(readings, key=lambda r: r.ts)


class _Pacer:
    """Sleeps until each reading's release time: ``rate`` readings/s, or event time divided by ``speedup``."""

    def __init__(self, rate: float | None, speedup: float | None):
        if rate is not None and speedup is not None:
            raise ValueError("give either rate or speedup, not both")
        if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
            raise ValueError("rate and speedup must be > 0")
        self.rate, self.speedup = rate, speedup
        self.start = time.monotonic()
        self.count = 0
        self.event_ms = 0  # event time elapsed; a step back in time (next device in file order) adds nothing
        self.previous_ts: int | None = None

    def release_time(self, r: Reading) -> float:
        if self.rate is not None:
            self.count += 1
            return self.start + (self.count - 1) / self.rate
        if self.previous_ts is not None and r.ts > self.previous_ts:
            self.event_ms += r.ts - self.previous_ts
        self.previous_ts = r.ts
        return self.start + self.event_ms / 1000.0 / self.speedup


def produce(readings: Iterable[Reading], topic: str, config: dict, *, key: bytes | None, batch: int = 1,
            rate: float | None = None,
            speedup: float | None = None, loop: bool = False, start: int = 0, limit: int | None = None,
            max_batch_delay_s: float = 0.5, progress: Callable[[str], None] | None = None,
            progress_interval_s: float = 2.0, producer=None) -> ProduceResult:
    """Send ``readings`` to ``topic``; returns the counts once every message is acknowledged (or failed).

    key: the deployment's signing key (`models.integrity.signing_key`): each message is signed with its device's
        token derived from it; None sends unsigned messages (taken only with ingest.require_signed_telemetry off).
    batch: readings per message (1 = single-reading messages). rate: readings/s; speedup: replay event time this
        many times faster than real time (neither: full speed). loop: repeat forever (see `replay`).
    start: readings to skip first; limit: stop after this many readings. progress: called with a status line
        every ``progress_interval_s``. Ctrl-C stops the replay, sends what is buffered and returns with
        ``interrupted`` set. ``producer``: an existing confluent_kafka.Producer (``config`` is then unused).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if producer is None:
        producer = _connected_producer(config, topic)
    pacer = _Pacer(rate, speedup) if rate is not None or speedup is not None else None
    stream = itertools.islice(replay(readings, loop), start, None if limit is None else start + limit)
    sender = _Sender(producer, topic, batch, max_batch_delay_s, key)
    result = sender.result
    began = last_report = time.monotonic()
    last_count = 0
    try:
        for r in stream:
            if pacer is not None:
                sender.wait_until(pacer.release_time(r))
            sender.add(r)
            if result.readings % CHECK_EVERY_READINGS == 0 or pacer is not None:
                producer.poll(0)
                now = time.monotonic()
                if progress is not None and now - last_report >= progress_interval_s:
                    progress(_status(result, now - began, (result.readings - last_count) / (now - last_report)))
                    last_report, last_count = now, result.readings
    except KeyboardInterrupt:
        result.interrupted = True
    try:
        sender.send_all()
        undelivered = producer.flush(FLUSH_TIMEOUT_S)
    except KeyboardInterrupt:
        result.interrupted = True
        undelivered = len(producer)
    if undelivered:
        result.record_failure(f"{undelivered} messages not acknowledged before exit", undelivered)
    result.seconds = time.monotonic() - began
    if progress is not None:
        progress(_status(result, result.seconds, None) + (" (interrupted)" if result.interrupted else " (done)"))
    return result


def _connected_producer(config: dict, topic: str):
    """A Producer that has seen ``topic`` in the cluster's metadata, so a wrong address fails now, not after 30 s."""
    from confluent_kafka import KafkaException, Producer

    producer = Producer(config)
    try:
        metadata = producer.list_topics(topic, timeout=10).topics[topic]
    except KafkaException as exc:
        raise ConnectionError(f"no Kafka broker answers at {config.get('bootstrap.servers')} "
                              f"(FLEAD_KAFKA_BOOTSTRAP; is `flead up` running?): {exc}") from None
    if metadata.error is not None:
        raise ConnectionError(f"topic {topic!r} on {config.get('bootstrap.servers')}: {metadata.error.str()}")
    return producer


def _status(result: ProduceResult, seconds: float, recent_rate: float | None) -> str:
    average = result.readings / seconds if seconds > 0 else 0.0
    line = (f"produced {result.readings:,} readings in {result.messages:,} messages, {seconds:.1f} s, "
            f"{average:,.0f} readings/s")
    if recent_rate is not None:
        line += f" (now {recent_rate:,.0f}/s)"
    line += f"; delivered {result.delivered_readings:,} readings, {result.failed} failed"
    if result.errors:
        line += f" (first error: {result.errors[0]})"
    return line


class _Sender:
    """Encodes readings into messages (single or per-device batches), signs them with their device's token (unless
    ``key`` is None), sends them and counts delivery reports."""

    def __init__(self, producer, topic: str, batch: int, max_batch_delay_s: float, key: bytes | None):
        self.producer, self.topic, self.batch, self.key = producer, topic, batch, key
        self.max_batch_delay_s = max_batch_delay_s
        self.result = ProduceResult()
        self.buffers: dict[str, list[Reading]] = {}
        self.buffered_since: dict[str, float] = {}

    def _on_delivery(self, err, msg, readings: int = 1) -> None:
        if err is None:
            self.result.delivered_messages += 1
            self.result.delivered_readings += readings
        else:
            self.result.record_failure(f"{err.name()}: {err.str()}")

    def _send(self, key: str, value: bytes, readings: int) -> None:
        if self.key is not None:
            value = sign_device_message(value, self.key, key)
        if readings == 1:
            callback = self._on_delivery
        else:
            def callback(err, msg):
                self._on_delivery(err, msg, readings)
        while True:
            try:
                self.producer.produce(self.topic, value, key=key, on_delivery=callback)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                self.producer.poll(0.05)
            except Exception as exc:  # e.g. a message larger than message.max.bytes
                self.result.record_failure(f"{type(exc).__name__}: {exc}")
                break
        self.result.messages += 1

    def add(self, r: Reading) -> None:
        self.result.readings += 1
        if self.batch == 1:
            self._send(r.device_id, encode_reading(r), 1)
            return
        buffer = self.buffers.get(r.device_id)
        if buffer is None:
            buffer = self.buffers[r.device_id] = []
            self.buffered_since[r.device_id] = time.monotonic()
        buffer.append(r)
        if len(buffer) >= self.batch:
            self._send_buffer(r.device_id)

    def _send_buffer(self, device_id: str) -> None:
        readings = self.buffers.pop(device_id)
        del self.buffered_since[device_id]
        self._send(device_id, encode_batch(device_id, readings), len(readings))

    def send_stale(self) -> None:
        deadline = time.monotonic() - self.max_batch_delay_s
        for device_id in [d for d, since in self.buffered_since.items() if since <= deadline]:
            self._send_buffer(device_id)

    def send_all(self) -> None:
        for device_id in list(self.buffers):
            self._send_buffer(device_id)

    def wait_until(self, release: float) -> None:
        """Serve delivery reports and send stale partial batches until ``release`` (monotonic time)."""
        while True:
            self.send_stale()
            remaining = release - time.monotonic()
            if remaining <= 0:
                return
            self.producer.poll(min(remaining, self.max_batch_delay_s))
