"""Kafka → MongoDB sink: the stream's outputs (and the raw telemetry) become documents, each exactly once.

The stream job writes only to Kafka (MongoDB is far slower than the job); this service consumes the topics,
gathers messages for `sink.flush_interval_ms`, stores them as one batch and commits the Kafka offsets only after
the batch is stored: at-least-once delivery plus idempotent writes gives one copy of everything.

    topic (cfg.kafka.topics)   →  collection(s)
    telemetry                  →  device_data + metric_rollups   (one bucket document per device per batch;
                                                                  invalid or unsigned messages skipped: the
                                                                  stream job dead-letters them)
    scores                     →  predictions + alerts + score/daily/fleet roll-ups   (signed messages only)
    incidents                  →  incidents           (by incident_id; a later state replaces an earlier one)
    drift                      →  drift_events
    snapshots                  →  local_models        (these three: validly signed records only)
    dead_letters               →  dead_letters

Bad input never stops it: a message or record it cannot store (not JSON, a schema violation, a non-finite or
oversized number, a score's timestamp whose roll-up bucket overflows 64 bits (telemetry's own are bounded by
its wire format), a field name MongoDB cannot hold) becomes
one dead letter, ``_id`` = its Kafka position (``<topic>:<partition>:<offset>[:<record>]``), with a reason, and a
counter goes up; the rest of the batch is stored as usual. When MongoDB is unreachable the sink retries the same
batch with exponential back-off (`sink.retry_*`), never exiting. Roll-ups a crash left unwritten are written when
it starts again (storage.writer). Each reading is stored once per (device, seq), so what takes that place first
must be genuine: a score batch is stored only with a valid signature under the deployment's key (the stream job
signs them), a telemetry message only signed with its device's token (`ingest.require_signed_telemetry`;
`models.integrity`). It also merges roll-up partials (`rollups.compact_interval_s`) and deletes what
is past its retention horizon (`retention.*`).
"""
from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from config import Config
from models.integrity import (SIGNATURE_FIELD, device_message_problem, signing_key, verify_message,
                              verify_record)
from services import processes
from storage.buckets import ScoreBlock, ScorePart, score_block
from storage.mongo import Store, StorageUnavailable
from storage.schemas import SchemaViolation, check_document, check_field_names
from storage.writer import BucketWriter, stack_by_device
from telemetry.schema import (DRIFT, SCORES_SCHEMA, Columns, InvalidMessage, decode_columns, decode_incident,
                              decode_scores, load_object)

log = logging.getLogger(__name__)

SOURCE_TOPICS = ("telemetry", "scores", "snapshots", "dead_letters", "incidents", "drift")
POLL_TIMEOUT_S = 0.5
MAX_RAW_CHARS = 10_000
# Records stored as sent (their own fields): the collection each one goes to, and the field of its natural id.
EVENT_COLLECTIONS = {"snapshots": ("local_models", None), "incidents": ("incidents", "incident_id"),
                     "drift": ("drift_events", "event_id"), "dead_letters": ("dead_letters", None)}
# The wire-format checks of telemetry.schema first; the others are read as JSON objects and checked as documents.
EVENT_DECODERS = {"incidents": decode_incident, "drift": DRIFT.decode}
# The records only FLEAD's own processes make: stored only with a valid signature (models.integrity).
SIGNED_EVENTS = ("snapshots", "incidents", "drift", "dead_letters")  # all written by the stream job, signed


@dataclass
class Batch:
    """One flush's decoded input, ready to store."""

    scores: list[ScoreBlock] = field(default_factory=list)
    readings: list[Columns] = field(default_factory=list)
    events: dict[str, list[dict]] = field(default_factory=lambda: {key: [] for key in EVENT_COLLECTIONS})
    refused: list[dict] = field(default_factory=list)  # dead letters for what the sink could not store


class Refusal(NamedTuple):
    """A message or record the sink cannot store: its dead letter's id, the reason, the raw text, its device."""

    letter_id: str
    reason: str
    raw: str
    device_id: Any


class Decoded(NamedTuple):
    """Telemetry and scores of (a share of) one flush, decoded: what a decoding process returns."""

    readings: list[Columns]
    telemetry_invalid: int
    telemetry_refused: int  # no valid signature of the device
    scores: list[ScoreBlock]
    refused: list[Refusal]


class Trust(NamedTuple):
    """What the decoding processes verify signatures with: the deployment's key, and whether telemetry must be
    signed (`ingest.require_signed_telemetry`)."""

    key: bytes
    require_signed_telemetry: bool


def _text(raw) -> str:
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw).decode("utf-8", "replace")[:MAX_RAW_CHARS]
    return ("" if raw is None else str(raw))[:MAX_RAW_CHARS]


def decode_telemetry(messages: list[tuple[bytes | None, bytes]], trust: Trust) -> tuple[list[Columns], int, int]:
    """Telemetry messages (Kafka key, value) as reading blocks (one per device), how many were invalid (refused by
    the wire format, or a device_id under another Kafka key) and how many refused for their signature (not the
    device's token; unsigned, unless `Trust.require_signed_telemetry` is off). The stream job dead-letters all of
    them."""
    blocks, invalid, refused = [], 0, 0
    for key, value in messages:
        try:
            block = decode_columns(value)
        except InvalidMessage:
            invalid += 1
            continue
        key = (key or b"").decode("utf-8", "replace")
        if key and key != block.device_id:
            invalid += 1
        elif device_message_problem(value, trust.key, block.device_id, trust.require_signed_telemetry):
            refused += 1
        elif len(block.seqs):
            blocks.append(block)
    return stack_by_device(blocks), invalid, refused


def decode_score_messages(messages: list[tuple[str, bytes]], key: bytes) -> tuple[list[ScoreBlock], list[Refusal]]:
    """Scores-topic messages (Kafka position, value) as one `ScoreBlock` per device, and a `Refusal` for each
    message or record that cannot be stored (its dead letter's id is the position, plus the record's index in its
    message for a single bad record). A message is decoded only with a valid signature under `key`. Records are
    checked per device, not per message: one pass each."""
    parts: dict[str, list[ScorePart]] = {}
    refused = []
    for position, raw in messages:
        if problem := verify_message(raw or b"", key):
            refused.append(Refusal(position, problem, _text(raw), None))
            continue
        try:
            part = score_part(raw, position)
        except InvalidMessage as exc:
            refused.append(Refusal(position, exc.reason, _text(raw), exc.device_id))
            continue
        device = part.device_id
        parts.setdefault(device if isinstance(device, str) else repr(device), []).append(part)
    blocks = []
    for device_parts in parts.values():
        block, bad = score_block(device_parts[0].device_id, device_parts)
        if block is not None:
            blocks.append(block)
        refused += [Refusal(f"{position}:{index}", reason, _text(json.dumps(record, default=str)),
                            record.get("device_id") if type(record) is dict else None)
                    for position, index, reason, record in bad]
    return blocks, refused


def decode_streams(telemetry: list[tuple[bytes | None, bytes]], scores: list[tuple[str, bytes]], trust: Trust
                   ) -> Decoded:
    """`decode_telemetry` and `decode_score_messages` of one share of a flush: what the decoding processes
    (`sink.decode_processes`) run, each on the messages of its own devices, while the sink stores the previous
    flush. The garbage collector pauses meanwhile: decoded JSON holds no reference cycles, and the collector's
    passes over the many records alive at once cost more than the decoding around them."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        readings, invalid, unsigned = decode_telemetry(telemetry, trust)
        blocks, refused = decode_score_messages(scores, trust.key)
    finally:
        if collecting:
            gc.enable()
    return Decoded(readings, invalid, unsigned, blocks, refused)


def score_part(raw: bytes, position: str) -> ScorePart:
    """A scores-topic message as a `ScorePart`: a `flead.scores/1` batch keeps its shared fields apart (the records
    are checked column-wise and merged only to become alerts), a single record is a part of one. The same
    checks and reasons as `telemetry.schema.decode_scores`, which merges every record (the ``signature`` is left
    out: `decode_score_messages` verified it)."""
    msg = load_object(raw)
    msg.pop(SIGNATURE_FIELD, None)
    if "scores" not in msg:
        return ScorePart(position, {}, [msg])
    if msg.get("schema") != SCORES_SCHEMA:
        return ScorePart(position, {}, decode_scores(raw))  # raises InvalidMessage with its reason
    items = msg.pop("scores")
    del msg["schema"]
    if type(items) is not list or not all(type(item) is dict for item in items):
        return ScorePart(position, {}, decode_scores(raw))  # raises InvalidMessage with its reason
    return ScorePart(position, msg, items)


def event_document(key: str, record: dict, position: str, signing_key: bytes) -> dict:
    """The document a snapshot / incident / drift event / dead letter record (read at Kafka `position`) becomes;
    `SchemaViolation` if it cannot be stored (the reason names the field). Each must carry a valid signature under
    `signing_key` (the stream job's): a forged one stored under its natural id would hide the genuine one (a
    snapshot from the aggregator; an incident's newer forged state would replace or resolve the real one), and
    forged dead letters would fill the data-quality figures with made-up refusals (they are stored as refusals
    of their own, with the signature's problem as the reason)."""
    collection, id_field = EVENT_COLLECTIONS[key]
    if key in SIGNED_EVENTS and (problem := verify_record(record, signing_key)):
        raise SchemaViolation(problem)
    check_field_names(record, key)
    doc = {k: v for k, v in record.items() if k != "schema"}
    if key == "snapshots":
        doc["_id"] = f"{record.get('device_id')}:{record.get('version')}"
    elif id_field is not None:
        doc["_id"] = record.get(id_field)
    else:  # dead letters: each message is one (identical ones stay apart), a replay finds it stored
        doc["_id"] = position
    check_document(collection, doc)
    if key == "incidents" and doc["end_seq"] < doc["start_seq"]:
        raise SchemaViolation(f"incidents: end_seq {doc['end_seq']} is before start_seq {doc['start_seq']}")
    return doc


class MongoSink:
    """Consumes the configured topics and stores them in MongoDB; `stats` counts what happened."""

    def __init__(self, cfg: Config, group_id: str = "flead-mongo-sink", topics: tuple[str, ...] = SOURCE_TOPICS):
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.signing_key = signing_key(cfg)  # SIGNED_EVENTS and score batches are stored only validly signed
        self.trust = Trust(self.signing_key, cfg.ingest.require_signed_telemetry)
        self.topic_keys = {cfg.kafka.topics[key]: key for key in topics}
        self.consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": group_id,
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                  "log_level": 3})
        self.assigned_at: float | None = None  # idle time counts from the first partition assignment
        self.reassigned = False                # partitions moved: another sink may have written meanwhile
        self.consumer.subscribe(list(self.topic_keys), on_assign=self._on_assign)
        self.stats: Counter = Counter()
        self.store: Store | None = None
        self.writer: BucketWriter | None = None
        self.next_prune = 0.0
        self.next_compaction = time.monotonic() + cfg.rollups.compact_interval_s
        self.input_paused = threading.Event()  # no message came for a while: roll up what is stored now
        self.seconds: Counter = Counter()  # time spent decoding (consuming thread) and storing (storing thread)
        self.decoder: ProcessPoolExecutor | None = None

    def _on_assign(self, consumer, partitions) -> None:
        if self.assigned_at is not None:
            self.reassigned = True
        self.assigned_at = self.assigned_at or time.monotonic()

    # --- MongoDB, retried -------------------------------------------------------------------------------------

    def _retrying(self, action: Callable, what: str, should_stop: Callable[[], bool]):
        """Run `action` until it succeeds; while MongoDB is unreachable wait with exponential back-off. Raises
        `StorageUnavailable` only when asked to stop meanwhile."""
        delay = self.cfg.sink.retry_initial_s
        while True:
            try:
                return action()
            except StorageUnavailable as exc:
                self.stats["mongo_retries"] += 1
                log.warning("%s: MongoDB unavailable (%s); retrying in %.1f s", what, exc, delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if should_stop():
                        raise
                    time.sleep(min(0.2, delay))
                delay = min(delay * 2, self.cfg.sink.retry_max_s)

    def _connect(self) -> None:
        if self.store is None:
            self.store = Store(self.cfg)
        if self.writer is None or self.writer.store is not self.store:
            writer = BucketWriter(self.store)
            found = writer.load()
            self.writer = writer
            if found["repaired_generations"]:
                self.stats["rollup_generations_repaired"] += len(found["repaired_generations"])

    # --- decoding ---------------------------------------------------------------------------------------------

    def _refuse(self, batch: Batch, letter_id: str, topic: str, reason: str, raw, device_id=None) -> None:
        key = self.topic_keys[topic]
        self.stats[f"{key}_refused"] += 1
        batch.refused.append({"_id": letter_id, "source": topic, "reason": f"{key}: {reason}", "raw": _text(raw),
                              "device_id": device_id if isinstance(device_id, str) else None,
                              "at": int(time.time() * 1000)})

    def decode(self, messages: list) -> Batch:
        """The records of these Kafka messages, checked; what cannot be stored becomes a dead letter. Telemetry and
        scores (nearly all of the work) go to the decoding processes, if there are any, split by Kafka key (a
        device's messages stay together and in order); this process reads the rest meanwhile."""
        batch = Batch()
        shares = max(1, self.cfg.sink.decode_processes)
        telemetry: list[list] = [[] for _ in range(shares)]
        scores: list[list] = [[] for _ in range(shares)]
        events = []
        for msg in messages:
            if msg.error():
                self.stats["kafka_errors"] += 1
                log.warning("kafka: %s", msg.error())
                continue
            key = self.topic_keys[msg.topic()]
            if key == "telemetry":
                telemetry[hash(msg.key()) % shares].append((msg.key(), msg.value()))
            elif key == "scores":
                scores[hash(msg.key()) % shares].append((f"{msg.topic()}:{msg.partition()}:{msg.offset()}",
                                                         msg.value()))
            else:
                events.append(msg)
        shares_to_decode = [(t, s) for t, s in zip(telemetry, scores) if t or s]
        pool = self._decoder()
        decoding = self._submit(shares_to_decode)
        for msg in events:
            topic, raw = msg.topic(), msg.value()
            key, position = self.topic_keys[topic], f"{topic}:{msg.partition()}:{msg.offset()}"
            try:
                record = EVENT_DECODERS.get(key, load_object)(raw)
                batch.events[key].append(event_document(key, record, position, self.signing_key))
            except InvalidMessage as exc:
                self._refuse(batch, position, topic, exc.reason, raw)
            except SchemaViolation as exc:
                self._refuse(batch, position, topic, str(exc), raw, record.get("device_id"))
        results = (self._decoded(decoding, shares_to_decode) if pool
                   else [decode_streams(telemetry[0], scores[0], self.trust)])
        scores_topic = self.cfg.kafka.topics.scores
        for decoded in results:
            batch.readings += decoded.readings
            batch.scores += decoded.scores
            # the stream job dead-letters invalid telemetry (and so refuses to score it): only counted here
            self.stats["telemetry_invalid"] += decoded.telemetry_invalid
            self.stats["telemetry_refused"] += decoded.telemetry_refused
            for refusal in decoded.refused:
                self._refuse(batch, refusal.letter_id, scores_topic, refusal.reason, refusal.raw, refusal.device_id)
        return batch

    def _submit(self, shares: list) -> list | None:
        """Hand each (telemetry, scores) share to the decoding processes; None if they died meanwhile."""
        if self.decoder is None:
            return []
        try:
            return [self.decoder.submit(decode_streams, t, s, self.trust) for t, s in shares]
        except BrokenProcessPool:
            return None

    def _decoded(self, decoding: list | None, shares: list) -> list[Decoded]:
        """The results of the decoding processes; if one died (killed, out of memory), new processes decode the
        same shares again (counted as `decoder_restarts`): the sink goes on instead of failing the batch."""
        try:
            if decoding is not None:
                return [future.result() for future in decoding]
        except BrokenProcessPool:
            pass
        self.stats["decoder_restarts"] += 1
        log.warning("a decoding process died; starting new ones and decoding the batch again")
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.decoder = None
        self._decoder()
        return [future.result() for future in self._submit(shares)]

    def _decoder(self):
        """The processes that decode telemetry and scores (`sink.decode_processes`; None: this process does)."""
        if self.decoder is None and self.cfg.sink.decode_processes > 0:
            context = multiprocessing.get_context("spawn")  # not fork: the Kafka client's threads would not follow
            self.decoder = ProcessPoolExecutor(self.cfg.sink.decode_processes, mp_context=context,
                                               initializer=processes.exit_with_parent)
            for _ in range(self.cfg.sink.decode_processes):  # each starts (imports, about a second) while the
                self.decoder.submit(decode_streams, [], [], self.trust)  # group forms, not at the first flush
        return self.decoder

    # --- storing ----------------------------------------------------------------------------------------------

    def store_batch(self, batch: Batch) -> None:
        """Write one batch (idempotent: repeating it after a failure stores nothing twice)."""
        store = self.store
        written = self.writer.write(scores=batch.scores, readings=batch.readings)
        events = batch.events
        new = {"local_models": len(store.insert_new("local_models", events["snapshots"])),
               "incidents": store.store_incidents(events["incidents"]),
               "drift_events": len(store.insert_new("drift_events", events["drift"])),
               "dead_letters": len(store.insert_new("dead_letters", events["dead_letters"])),
               "dead_lettered": len(store.insert_new("dead_letters", batch.refused))}
        self.stats.update(predictions=written.predictions, alerts=written.alerts, device_data=written.device_data,
                          replayed=written.replayed, **new)

    def _prepared(self, action: Callable) -> Callable:
        """`action` after (re)connecting, and reloading what is stored when partitions moved."""
        def run():
            if self.reassigned:
                self.writer = None
                self.reassigned = False
            self._connect()
            return action()
        return run

    def _maintain(self, should_stop: Callable[[], bool], idle: bool = False) -> None:
        """Close the roll-up generation when due, or at once when the input pauses (`idle`: the dashboards
        then show everything stored); prune what is past its horizon when due."""
        self._retrying(self._prepared(lambda: self.writer.close_generation(force=idle)), "writing roll-ups",
                       should_stop)
        if time.monotonic() >= self.next_prune:
            deleted = self._retrying(self._prepared(lambda: self.store.prune()), "pruning", should_stop)
            for key, n in deleted.items():
                self.stats[f"pruned_{key}"] += n
            self.next_prune = time.monotonic() + self.cfg.retention.prune_interval_s
        if time.monotonic() >= self.next_compaction:
            merged = self._retrying(self._prepared(lambda: self.writer.compact_rollups()), "compacting roll-ups",
                                    should_stop)
            self.stats["rollup_partials_merged"] += sum(merged.values())
            self.next_compaction = time.monotonic() + self.cfg.rollups.compact_interval_s

    def _gather(self) -> list:
        """Messages of one flush: until `sink.flush_interval_ms` passed since the first, or
        `sink.max_batch_messages` arrived; [] after `POLL_TIMEOUT_S` without any."""
        limit, window = self.cfg.sink.max_batch_messages, self.cfg.sink.flush_interval_ms / 1000
        messages = self.consumer.consume(limit, timeout=POLL_TIMEOUT_S)
        if not messages:
            return []
        deadline = time.monotonic() + window
        while len(messages) < limit and (left := deadline - time.monotonic()) > 0:
            messages += self.consumer.consume(limit - len(messages), timeout=min(left, POLL_TIMEOUT_S))
        return messages

    @staticmethod
    def _next_offsets(messages: list) -> list:
        """The offsets to commit once these messages are stored: per partition, the last one's + 1."""
        from confluent_kafka import TopicPartition

        last: dict = {}
        for msg in messages:
            if not msg.error():
                key = (msg.topic(), msg.partition())
                last[key] = max(last.get(key, -1), msg.offset())
        return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]

    def _commit(self, offsets: list) -> None:
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # a rebalance meanwhile: the messages come again and are found stored
            self.stats["commit_failures"] += 1
            log.warning("kafka: committing offsets failed (%s); the batch will be read again", exc)

    def _store_loop(self, work: queue.Queue, done: queue.Queue, should_stop: Callable[[], bool]) -> None:
        """The storing thread: batches from `work` (None: stop), their offsets to `done` once stored; roll-ups
        and pruning when due or when the input pauses. Kafka stays with the consuming thread (the consumer is
        not thread-safe)."""
        try:
            self._retrying(self._prepared(lambda: None), "starting", should_stop)
            while True:
                try:
                    item = work.get(timeout=POLL_TIMEOUT_S)
                except queue.Empty:
                    self._maintain(should_stop, idle=self.input_paused.is_set())
                    continue
                if item is None:
                    break
                batch, offsets = item
                started = time.perf_counter()
                self._retrying(self._prepared(lambda: self.store_batch(batch)), "storing a batch", should_stop)
                self.seconds["storing"] += time.perf_counter() - started
                self.stats["flushes"] += 1
                done.put(offsets)
                self._maintain(should_stop, idle=False)
            if self.writer is not None:  # roll up what this run stored
                self.writer.close_generation(force=True)
        except StorageUnavailable:
            log.warning("stopping while MongoDB is unavailable: the last batch will be read again next time")
        except BaseException as exc:  # handed to the consuming thread, which raises it
            done.put(exc)
        finally:
            done.put("stopped")

    def run(self, until_idle_s: float | None = None, should_stop: Callable[[], bool] = lambda: False,
            progress: Callable[[str], None] | None = None, progress_every_s: float = 5.0) -> Counter:
        """Consume until `should_stop()`, or until no message came for `until_idle_s` seconds.

        Two threads: this one consumes the next batch and has it decoded (by the decoding processes,
        `sink.decode_processes`) while the other stores the previous one, so decoding, storing and MongoDB's own
        work overlap on separate cores."""
        work: queue.Queue = queue.Queue(maxsize=1)
        done: queue.Queue = queue.Queue()
        storing = threading.Thread(target=self._store_loop, args=(work, done, should_stop), name="sink-store",
                                   daemon=True)
        storing.start()
        self._decoder()
        last_message = last_report = time.monotonic()
        in_flight = 0
        try:
            while not should_stop() and storing.is_alive():
                while not done.empty():
                    item = done.get()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, list):
                        self._commit(item)
                        in_flight -= 1
                messages = self._gather()
                if messages:
                    self.input_paused.clear()
                    started = time.perf_counter()
                    batch = self.decode(messages)
                    self.seconds["decoding"] += time.perf_counter() - started
                    now = int(time.time() * 1000)
                    for key, docs in (*batch.events.items(), ("refused", batch.refused)):
                        for doc in docs if key != "snapshots" else ():  # snapshots are stored as signed
                            doc["stored_at"] = now
                    while storing.is_alive():
                        try:  # waits while the storing thread is busy with the previous batch
                            work.put((batch, self._next_offsets(messages)), timeout=POLL_TIMEOUT_S)
                            in_flight += 1
                            break
                        except queue.Full:
                            if should_stop():
                                break
                    last_message = time.monotonic()
                else:
                    self.input_paused.set()
                    if (until_idle_s is not None and self.assigned_at is not None and in_flight == 0
                            and time.monotonic() - max(last_message, self.assigned_at) >= until_idle_s):
                        break
                if progress and time.monotonic() - last_report >= progress_every_s:
                    progress(self.describe())
                    last_report = time.monotonic()
        finally:
            while storing.is_alive():
                try:
                    work.put(None, timeout=POLL_TIMEOUT_S)
                    break
                except queue.Full:
                    continue
            storing.join()
            error = None
            while not done.empty():
                item = done.get()
                if isinstance(item, list):
                    self._commit(item)
                elif isinstance(item, BaseException):
                    error = item
            self.consumer.close()
            if self.decoder is not None:
                self.decoder.shutdown(cancel_futures=True)
                self.decoder = None
            if self.store is not None:
                self.store.close()
            if error is not None:
                raise error
        return self.stats

    def describe(self) -> str:
        if not self.stats:
            return "sink: idle"
        spent = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(self.seconds.items()))
        return "sink: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()) if v) + f" ({spent})"
