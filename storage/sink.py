"""Kafka → MongoDB sink: the stream's outputs (and the raw telemetry) become documents, idempotently.

The stream job writes only to Kafka (MongoDB is far slower than the job); this service consumes the topics,
writes each batch with natural ids (a replay never duplicates), and commits Kafka offsets only after the
batch is stored — at-least-once delivery plus idempotent writes gives exactly one document per record.

    topic (cfg.kafka.topics)   →  collection(s)
    telemetry                  →  device_data            (decoded with telemetry.schema; invalid ones skipped:
                                                          the stream job dead-letters them)
    scores                     →  predictions, alerts, score_rollups  (batches of score records; alerts = the
                                                          anomalous ones; roll-ups sum the new ones)
    snapshots                  →  local_models
    dead_letters               →  dead_letters
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from typing import Callable

from config import Config
from storage import mongo
from storage.schemas import SchemaViolation
from telemetry.schema import InvalidMessage, decode_scores, load_object

log = logging.getLogger(__name__)

SOURCE_TOPICS = ("telemetry", "scores", "snapshots", "dead_letters")
POLL_BATCH = 2000
POLL_TIMEOUT_S = 0.5


def _device_data(raw_values: list[bytes]) -> tuple[list[dict], int]:
    from telemetry.schema import decode_message

    docs, invalid = [], 0
    for raw in raw_values:
        try:
            readings = decode_message(raw)
        except InvalidMessage:
            invalid += 1
            continue
        for r in readings:
            metrics = {k: (v if v == v else None) for k, v in r.metrics.items()}  # NaN → null (BSON-safe, JSON-safe)
            docs.append({"device_id": r.device_id, "seq": r.seq, "ts": r.ts, "metrics": metrics, "label": r.label})
    return docs, invalid


class MongoSink:
    """Consumes the configured topics and stores them in MongoDB; `stats` counts what happened."""

    def __init__(self, cfg: Config, group_id: str = "flead-mongo-sink", topics: tuple[str, ...] = SOURCE_TOPICS):
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.db = mongo.connect(cfg)
        self.topic_keys = {cfg.kafka.topics[key]: key for key in topics}
        self.consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": group_id,
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                  "log_level": 3})
        self.assigned_at: float | None = None  # idle time counts from the first partition assignment
        self.consumer.subscribe(list(self.topic_keys), on_assign=self._on_assign)
        self.stats: Counter = Counter()

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned_at = self.assigned_at or time.monotonic()

    def _store(self, key: str, values: list[bytes]) -> None:
        cfg, db = self.cfg, self.db
        if key == "telemetry":
            docs, invalid = _device_data(values)
            self.stats["telemetry_invalid"] += invalid
            self.stats["device_data"] += mongo.write_device_data(db, cfg, docs)
            return
        records, bad = [], []
        for raw in values:
            try:  # a scores message is a batch of one device's score records (or a single record)
                records.extend(decode_scores(raw) if key == "scores" else [load_object(raw)])
            except InvalidMessage as exc:
                bad.append({"reason": f"{key}: {exc.reason}", "raw": (raw or b"").decode("utf-8", "replace")[:10_000],
                            "source": self.cfg.kafka.topics[key], "device_id": None, "at": int(time.time() * 1000)})
        if bad:
            self.stats["dead_letters_from_sink"] += mongo.write_dead_letters(db, cfg, bad)
        try:
            if key == "scores":
                new_predictions, new_alerts = mongo.write_predictions(db, cfg, records)
                self.stats["predictions"] += new_predictions
                self.stats["alerts"] += new_alerts
            elif key == "snapshots":
                self.stats["local_models"] += mongo.write_local_models(db, cfg, records)
            elif key == "dead_letters":
                self.stats["dead_letters"] += mongo.write_dead_letters(db, cfg, records)
        except SchemaViolation as exc:
            # One bad record must not block the batch: store the good ones, dead-letter the rest with the reason.
            self._store_one_by_one(key, records, first_error=exc)

    def _store_one_by_one(self, key: str, records: list[dict], first_error: Exception) -> None:
        log.warning("%s: schema violation in batch (%s); storing record by record", key, first_error)
        writers: dict[str, Callable] = {"scores": mongo.write_predictions, "snapshots": mongo.write_local_models,
                                        "dead_letters": mongo.write_dead_letters}
        stored = {"snapshots": "local_models", "dead_letters": "dead_letters"}.get(key)
        for record in records:
            try:
                written = writers[key](self.db, self.cfg, [record])
                if key == "scores":
                    self.stats["predictions"] += written[0]
                    self.stats["alerts"] += written[1]
                else:
                    self.stats[stored] += written
            except SchemaViolation as exc:
                self.stats[f"{key}_invalid"] += 1
                mongo.write_dead_letters(self.db, self.cfg, [{
                    "reason": f"schema: {exc}", "raw": json.dumps(record, default=str)[:10_000],
                    "source": self.cfg.kafka.topics[key], "device_id": record.get("device_id"),
                    "at": int(time.time() * 1000)}])

    def poll_once(self) -> int:
        """Consume one batch, store it, commit its offsets; returns the number of messages handled."""
        messages = self.consumer.consume(POLL_BATCH, timeout=POLL_TIMEOUT_S)
        by_topic: dict[str, list[bytes]] = defaultdict(list)
        for msg in messages:
            if msg.error():
                self.stats["kafka_errors"] += 1
                log.warning("kafka: %s", msg.error())
                continue
            by_topic[msg.topic()].append(msg.value())
        for topic, values in by_topic.items():
            self._store(self.topic_keys[topic], values)
        if messages:
            self.consumer.commit(asynchronous=False)
        return len(messages)

    def run(self, until_idle_s: float | None = None, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[str], None] | None = None, progress_every_s: float = 5.0) -> Counter:
        """Consume until `should_stop()`, or until no message came for `until_idle_s` seconds."""
        last_message = last_report = time.monotonic()
        try:
            while not should_stop():
                if self.poll_once():
                    last_message = time.monotonic()
                elif (until_idle_s is not None and self.assigned_at is not None
                      and time.monotonic() - max(last_message, self.assigned_at) >= until_idle_s):
                    break
                if progress and time.monotonic() - last_report >= progress_every_s:
                    progress(self.describe())
                    last_report = time.monotonic()
        finally:
            self.consumer.close()
        return self.stats

    def describe(self) -> str:
        return "sink: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())) if self.stats else "sink: idle"
