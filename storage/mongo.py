"""MongoDB access for FLEAD: `Store`, one object for every reader and writer of the database.

    with Store(cfg) as store:                  # connects (or raises StorageError), closes on exit
        store.init()                           # collections, validators where supported, indexes
        store.write_scores(records)            # bucketed predictions + alerts + roll-ups
        store.latest_global_model()

Every write is keyed by the document's natural id (docs/contracts.md), so replaying a record never duplicates
it. Writes are inserts wherever possible: the embedded server (FerretDB v1) scans the whole collection for every
update, delete or filtered read, so the sink never updates or queries a large collection on its hot path.
Collection names come from `mongo.collections`; methods take the collection's *key* (``"predictions"``).
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pymongo
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, ProtocolError, PyMongoError

from config import Config
from storage.buckets import (MAX_ABS_TS, SCORE_COLUMNS, ScorePart, newest_buckets, readings_of, score_block,
                             unpack_columns)
from storage import summaries
from storage.errors import StorageError, StorageUnavailable
from storage.schemas import INDEXES, SCHEMAS, SchemaViolation, check_document

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
UPSERT_CHUNK = 50  # FerretDB v1 stalls on larger bulk upserts
RAW_KEYS = ("device_data", "predictions", "alerts", "local_models")
SUMMARY_KEYS = ("score_rollups", "daily_rollups", "fleet_rollups", "metric_rollups", "incidents", "drift_events",
                "dead_letters")
DAY_MS = 86_400_000
# Retention counts from when the sink stored a document (`stored_at`), except for signed records, stored as sent.
RETENTION_FIELD = {"local_models": "created_at"}

# The embedded server (FerretDB v1) fills a reply by count (101 documents first, then as many as the cursor's batch
# size asks), not by MongoDB's 16 MiB, and the driver refuses a reply longer than the wire protocol's 48 MB
# (ProtocolError): 101 snapshots of devices of 1,000 metrics are 48.5 MB. `read_documents` then reads again with
# fewer documents per reply; a lazy read of documents that can be large asks for `batch_size_for` their size.
MAX_REPLY_BYTES = 48_000_000  # the wire protocol's maximum message (pymongo's MAX_MESSAGE_SIZE)
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's (and FerretDB's) largest document
SMALLER_BATCHES = (16, 1)  # documents per reply after a reply too long: ≤ 3 MB on average, then any document
READ_VALUES = 16_000_000  # metric values (8 bytes each, 128 MB) read at a time (`storage.buckets.newest_buckets`)

__all__ = ["Store", "StorageError", "StorageUnavailable", "SchemaViolation", "reading_id", "retention_cutoffs",
           "mongo_healthy", "read_documents", "batch_size_for", "READ_VALUES"]


def _failure(exc: PyMongoError, what: str) -> StorageError:
    kind = StorageUnavailable if isinstance(exc, ConnectionFailure) else StorageError
    return kind(f"{what}: {exc.__class__.__name__}: {str(exc)[:300]}")


def batch_size_for(document_bytes: int) -> int:
    """A lazy read's ``batch_size`` for documents of up to `document_bytes` each: its replies stay within half the
    wire protocol's largest message.

    >>> batch_size_for(MAX_DOCUMENT_BYTES), batch_size_for(4_500_000), batch_size_for(10_000)
    (1, 5, 2400)
    """
    return max(1, MAX_REPLY_BYTES // 2 // document_bytes)


def read_documents(collection, query: dict | None = None, projection: dict | None = None, batch_size: int = 0,
                   **kwargs) -> list[dict]:
    """``collection.find(...)`` as a list, read again with fewer documents per reply (`SMALLER_BATCHES`) when a
    reply was longer than the wire protocol allows (module comment above `MAX_REPLY_BYTES`). Other errors raise.
    `batch_size` 0: the server's default."""
    sizes = [batch_size, *(n for n in SMALLER_BATCHES if not 0 < batch_size <= n)]
    for size, smaller in zip(sizes, sizes[1:]):
        try:
            return list(collection.find(query or {}, projection, batch_size=size, **kwargs))
        except ProtocolError as exc:
            if "max message size" not in str(exc):
                raise
            log.warning("reading %s: a reply of %s documents was too long (%s); reading again %d per reply",
                        collection.name, size or "the server's default number of", exc, smaller)
    return list(collection.find(query or {}, projection, batch_size=sizes[-1], **kwargs))


def mongo_healthy(uri: str, timeout_ms: int = 2000) -> bool:
    """True when the MongoDB server at `uri` answers a ping (`flead up`/`status`/`doctor`, `/healthz`)."""
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms)
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:  # any driver error means "not healthy yet"
        return False
    finally:
        client.close()


def reading_id(device_id: str, seq: int) -> str:
    """Natural id of anything about one reading: ``<device_id>:<seq>``."""
    return f"{device_id}:{seq}"


def retention_cutoffs(cfg: Config, now_ms: int) -> dict[str, int]:
    """Per collection key, the `stored_at` before which documents are deleted (keys kept forever are absent).

    >>> from config import load_config
    >>> cutoffs = retention_cutoffs(load_config(env={"FLEAD_RETENTION_RAW_DAYS": "1"}), now_ms=5 * DAY_MS)
    >>> cutoffs["predictions"] == 4 * DAY_MS, cutoffs["incidents"] < 0
    (True, True)
    """
    out = {}
    for keys, days in ((RAW_KEYS, cfg.retention.raw_days), (SUMMARY_KEYS, cfg.retention.summary_days)):
        if days > 0:
            out.update(dict.fromkeys(keys, now_ms - int(days * DAY_MS)))
    return out


def reading_block(reading):
    """One reading (a `telemetry.schema.Reading` or a dict of its fields) as a one-row `Columns` block for
    `BucketWriter.write`; `SchemaViolation` if it cannot be stored."""
    from telemetry.schema import Columns

    get = reading.get if isinstance(reading, dict) else lambda name, default=None: getattr(reading, name, default)
    device_id, seq, ts, metrics = get("device_id"), get("seq"), get("ts"), get("metrics")
    where = f"device_data: reading {device_id!r}:{seq!r}"
    if not isinstance(device_id, str) or not device_id or type(seq) is not int or seq < 0 or type(ts) is not int:
        raise SchemaViolation(f"{where}: needs a device_id, an int seq >= 0 and an int ts")
    if not -MAX_ABS_TS <= ts <= MAX_ABS_TS:
        raise SchemaViolation(f"{where}: ts {ts} is outside the storable range (|ts| <= 2^62 ms)")
    if not isinstance(metrics, dict) or not all(v is None or type(v) in (int, float) for v in metrics.values()):
        raise SchemaViolation(f"{where}: metrics must map names to numbers or null")
    values = np.array([[math.nan if v is None else v for v in metrics.values()]], dtype=np.float64)
    return Columns(device_id, tuple(metrics), values, [seq], [ts], [get("label")])


def _created_between(since_ms: int | None, until_ms: int | None) -> dict:
    window = {}
    if since_ms is not None:
        window["$gt"] = since_ms
    if until_ms is not None:
        window["$lte"] = until_ms
    return {"created_at": window} if window else {}


def incident_rank(doc: dict) -> tuple:
    """Order of an incident's states: resolved after open, then a later end."""
    return doc.get("status") == "resolved", doc.get("end_seq", -1), doc.get("n_flagged", -1), doc.get("updated_at", -1)


class Store:
    """FLEAD's MongoDB database. A context manager: the connection closes on exit (or `close()`)."""

    def __init__(self, cfg: Config, timeout_ms: int = 5000):
        self.cfg = cfg
        self.client = pymongo.MongoClient(cfg.mongo_uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=True)
        try:
            self.client.admin.command("ping")
        except PyMongoError as exc:
            self.client.close()
            raise StorageUnavailable(
                f"FLEAD_MONGO_URI: cannot connect to {cfg.mongo_uri_redacted} ({exc.__class__.__name__}); start the "
                f"embedded server with `flead up` or point FLEAD_MONGO_URI at a MongoDB") from exc
        self.db = self.client[cfg.mongo.database]
        self._writer = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.client.close()

    @property
    def name(self) -> str:
        return self.db.name

    def collection(self, key: str):
        """The collection configured under `mongo.collections.<key>`."""
        return self.db[self.cfg.mongo.collections[key]]

    def ping(self) -> None:
        """Raise `StorageUnavailable` unless the server answers."""
        try:
            self.client.admin.command("ping")
        except PyMongoError as exc:
            raise _failure(exc, f"ping {self.cfg.mongo_uri_redacted}") from exc

    # --- set-up -----------------------------------------------------------------------------------------------

    def init(self) -> dict[str, bool]:
        """Create every collection with its validator (where the server supports them) and indexes; idempotent.

        Returns, per collection key, whether the server enforces the schema itself.
        """
        existing = set(self.db.list_collection_names())
        enforced: dict[str, bool] = {}
        for key, schema in SCHEMAS.items():
            name = self.cfg.mongo.collections[key]
            validator = {"$jsonSchema": schema}
            try:
                if name in existing:
                    self.db.command({"collMod": name, "validator": validator, "validationLevel": "strict"})
                else:
                    self.db.create_collection(name, validator=validator, validationLevel="strict")
                enforced[key] = True
            except OperationFailure as exc:
                if exc.code not in (238, 115):  # NotImplemented / CommandNotSupported (FerretDB v1)
                    raise StorageError(f"creating collection {name}: {exc}") from exc
                if name not in existing and name not in self.db.list_collection_names():
                    self.db.create_collection(name)
                enforced[key] = False  # check_document guards writes instead
            for keys, options in INDEXES[key]:
                self.db[name].create_index(keys, **options)
        return enforced

    # --- generic writes ---------------------------------------------------------------------------------------

    def _checked(self, key: str, docs: Iterable[dict], need_id: bool = True) -> list[dict]:
        """Validate a whole batch before anything is written, so a bad document never leaves half a batch."""
        docs = list(docs)
        for doc in docs:
            if need_id and "_id" not in doc:
                raise SchemaViolation(f"{key}: document without _id: {str(doc)[:120]}")
            check_document(key, doc)
        return docs

    def insert_new(self, key: str, docs: Iterable[dict], need_id: bool = True) -> list[dict]:
        """Insert documents that carry their natural `_id`; ones already stored are kept (first write wins).

        Returns the documents that were new, so replays are harmless. Inserts, not upserts: FerretDB v1 scans the
        collection for each upsert and stalls on bulk upserts of more than ~100 documents.
        """
        docs = self._checked(key, docs, need_id)
        new = []
        batch = self.cfg.mongo.write_batch_size
        name = self.cfg.mongo.collections[key]
        for start in range(0, len(docs), batch):
            chunk = docs[start:start + batch]
            try:
                self.collection(key).insert_many(chunk, ordered=False)
                new.extend(chunk)
            except BulkWriteError as exc:
                errors = exc.details["writeErrors"]
                other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
                if other:
                    raise StorageError(f"writing to {name}: {other[0].get('errmsg')}") from exc
                stored_before = {e["index"] for e in errors}
                new.extend(doc for i, doc in enumerate(chunk) if i not in stored_before)
            except PyMongoError as exc:
                raise _failure(exc, f"writing {len(chunk)} documents to {name}") from exc
        return new

    def upsert(self, key: str, docs: Iterable[dict]) -> int:
        """Validate and replace-or-insert documents by `_id` (last write wins); returns how many were written.
        For small collections only (each upsert scans the collection on the embedded server)."""
        docs = self._checked(key, docs)
        for start in range(0, len(docs), UPSERT_CHUNK):
            ops = [pymongo.ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs[start:start + UPSERT_CHUNK]]
            try:
                self.collection(key).bulk_write(ops, ordered=False)
            except PyMongoError as exc:
                raise _failure(exc, f"writing {len(ops)} documents to {self.cfg.mongo.collections[key]}") from exc
        return len(docs)

    def replace_newer(self, key: str, docs: Iterable[dict], rank: Callable[[dict], tuple]) -> list[dict]:
        """Store documents by `_id` unless the stored one ranks at least as high; returns the documents written.

        One read, one delete and one insert per call whatever the number of documents (not one update each)."""
        latest: dict = {}
        for doc in self._checked(key, docs):
            if doc["_id"] not in latest or rank(doc) > rank(latest[doc["_id"]]):
                latest[doc["_id"]] = doc
        if not latest:
            return []
        try:
            stored = {d["_id"]: d for d in read_documents(self.collection(key), {"_id": {"$in": list(latest)}})}
            newer = [d for i, d in latest.items() if i not in stored or rank(d) > rank(stored[i])]
            replaced = [d["_id"] for d in newer if d["_id"] in stored]
            if replaced:
                self.collection(key).delete_many({"_id": {"$in": replaced}})
        except PyMongoError as exc:
            raise _failure(exc, f"replacing documents of {self.cfg.mongo.collections[key]}") from exc
        return self.insert_new(key, newer)

    def find(self, key: str, query: dict | None = None, fields: Sequence[str] | None = None, **kwargs) -> list[dict]:
        """Documents of a collection (optionally only `fields`), as a list."""
        projection = None if fields is None else dict.fromkeys(fields, 1)
        try:
            return read_documents(self.collection(key), query, projection, **kwargs)
        except PyMongoError as exc:
            raise _failure(exc, f"reading {self.cfg.mongo.collections[key]}") from exc

    # --- bucketed readings and scores (storage.buckets, storage.writer) ---------------------------------------

    @property
    def writer(self):
        """The `BucketWriter` of direct writes through this Store (not the sink's): loaded on first use."""
        if self._writer is None:
            from storage.writer import BucketWriter

            self._writer = BucketWriter(self)
            self._writer.load()
        return self._writer

    def write_scores(self, records: Iterable[dict]) -> tuple[int, int]:
        """Store score records (bucketed into `predictions`, anomalous ones also in `alerts`) and their roll-ups;
        returns how many readings and alerts were new. If any record cannot be stored, nothing is written and
        `SchemaViolation` names the first such record and why."""
        by_device: dict = defaultdict(list)
        for record in records:
            by_device[record.get("device_id") if isinstance(record, dict) else None].append(record)
        blocks = []
        for device, device_records in by_device.items():
            block, bad = score_block(device, [ScorePart(None, {}, device_records)])
            if bad:
                raise SchemaViolation(f"score record {bad[0][3]!r:.120}: {bad[0][2]}")
            blocks.append(block)
        written = self.writer.write(scores=blocks)
        self.writer.close_generation(force=True)
        return written.predictions, written.alerts

    def write_readings(self, readings: Iterable) -> int:
        """Store raw readings (`telemetry.schema.Reading`s, or dicts ``device_id, seq, ts, metrics[, label]``)
        bucketed into `device_data`, with their metric roll-ups; returns how many were new."""
        blocks = [reading_block(r) for r in readings]
        written = self.writer.write(readings=blocks)
        self.writer.close_generation(force=True)
        return written.device_data

    def count_readings(self, key: str = "predictions") -> int:
        """Readings stored in a bucketed collection (the sum of its documents' ``n``)."""
        try:
            result = list(self.collection(key).aggregate([{"$group": {"_id": None, "n": {"$sum": "$n"}}}]))
        except PyMongoError as exc:
            raise _failure(exc, f"counting {self.cfg.mongo.collections[key]}") from exc
        return int(result[0]["n"]) if result else 0

    def device_ids(self, key: str = "device_data") -> list[str]:
        """Every device with documents in `key`, sorted. A `$group`, whose results stream (``distinct`` answers in
        one document, which MongoDB caps at 16 MB: ~900,000 device ids), spilling to disk on MongoDB if it must."""
        try:
            groups = self.collection(key).aggregate([{"$group": {"_id": "$device_id"}}], allowDiskUse=True)
            return sorted(doc["_id"] for doc in groups if isinstance(doc["_id"], str))
        except PyMongoError as exc:
            raise _failure(exc, f"reading {self.cfg.mongo.collections[key]}") from exc

    def score_columns(self, query: dict | None = None) -> dict[str, np.ndarray]:
        """Every stored score record matching `query` (on bucket fields) as columns, plus ``device_id`` and
        ``incident_id`` (object arrays); rows grouped by device, each device's rows by seq."""
        parts: dict[str, list] = defaultdict(list)
        docs = sorted(self.find("predictions", query), key=lambda d: (d["device_id"], d["seq_first"]))
        for doc in docs:
            cols = unpack_columns(doc, SCORE_COLUMNS)
            for name in SCORE_COLUMNS:
                parts[name].append(cols[name])
            parts["device_id"].append(np.full(doc["n"], doc["device_id"], dtype=object))
            ids = np.array(doc.get("incident_ids", []) + [None], dtype=object)
            parts["incident_id"].append(ids[cols["incident"]])  # -1 picks the trailing None
        empty = {name: np.array([], dtype=dtype) for name, dtype in SCORE_COLUMNS.items()}
        out = {name: np.concatenate(parts[name]) if parts[name] else empty.get(name, np.array([], dtype=object))
               for name in (*SCORE_COLUMNS, "device_id", "incident_id")}
        order = np.lexsort((out["seq"], out["device_id"].astype(str))) if len(out["seq"]) else np.array([], int)
        return {name: values[order] for name, values in out.items()}

    def device_readings(self, device_ids: Sequence[str]) -> dict[str, dict]:
        """Every stored reading of these devices, by device, as `storage.buckets.readings_of` gives them."""
        groups = newest_buckets(self.reading_heads(device_ids), newest=0, max_values=READ_VALUES)
        return {device_id: readings for group in groups for device_id, readings in self.readings_in(group, newest=0)}

    def reading_heads(self, device_ids: Sequence[str]) -> list[dict]:
        """The heads (``_id, device_id, seq_last, n, metric_names``) of these devices' `device_data` documents, to
        choose which to read (`storage.buckets.newest_buckets`): one read (on the embedded server, one scan)."""
        return self.find("device_data", {"device_id": {"$in": list(device_ids)}},
                         ("_id", "device_id", "seq_last", "n", "metric_names"))

    def readings_in(self, group: dict[str, list], newest: int) -> Iterator[tuple[str, dict]]:
        """``(device_id, readings)`` for a group of `newest_buckets`: the group's documents in one read, each
        device's newest `newest` (0: all) of them as `storage.buckets.readings_of` gives them."""
        by_device: dict[str, list] = defaultdict(list)
        for doc in self.find("device_data", {"_id": {"$in": [i for ids in group.values() for i in ids]}}):
            by_device[doc["device_id"]].append(doc)
        for device_id in group:
            if by_device[device_id]:
                yield device_id, readings_of(by_device[device_id], newest)

    def sink_state(self, name: str) -> dict:
        """The sink's bookkeeping document `name` ({} before its first write)."""
        found = self.find("sink_state", {"_id": name})
        return found[0] if found else {}

    def set_sink_state(self, name: str, values: dict) -> None:
        """Replace the sink's bookkeeping document `name` (one small document: an update is cheap)."""
        self.upsert("sink_state", [{**values, "_id": name}])

    def rebuild_rollups(self) -> tuple[int, int]:
        """Recompute every roll-up from `predictions` and `device_data` (after a change of the bucket widths, or
        a database restored from elsewhere); returns (readings read, roll-up documents written). Run it while
        the sink is stopped."""
        from storage.writer import BucketWriter

        return BucketWriter(self).rebuild_rollups()

    # --- models and rounds ------------------------------------------------------------------------------------

    def write_local_models(self, snapshots: Iterable[dict]) -> int:
        """Store weight snapshots in `local_models` (id ``<device_id>:<version>``); returns how many were new."""
        docs = ({k: v for k, v in s.items() if k != "schema"} | {"_id": f"{s.get('device_id')}:{s.get('version')}"}
                for s in snapshots)  # the schema check on insert names a missing field; no field of ours is added:
        # a snapshot is stored as signed (models.integrity.wire_form), so retention counts from its created_at
        return len(self.insert_new("local_models", docs))

    def latest_local_models(self, since_ms: int | None = None, until_ms: int | None = None) -> list[dict]:
        """The newest snapshot of each device (created after `since_ms`, at or before `until_ms`, if given),
        newest first."""
        latest: dict[str, dict] = {}
        for doc in sorted(self.find("local_models", _created_between(since_ms, until_ms)),
                          key=lambda d: (d["device_id"], -d["version"])):
            latest.setdefault(doc["device_id"], doc)
        return sorted(latest.values(), key=lambda d: d["created_at"], reverse=True)

    def latest_local_model_ids(self, since_ms: int | None = None, until_ms: int | None = None) -> list[str]:
        """`_id` of the newest snapshot of each device in the window, without the weights (cheap for big fleets)."""
        latest: dict[str, str] = {}
        docs = self.find("local_models", _created_between(since_ms, until_ms), ("_id", "device_id", "version"))
        for doc in sorted(docs, key=lambda d: (d["device_id"], -d["version"])):
            latest.setdefault(doc["device_id"], doc["_id"])
        return sorted(latest.values())

    def local_models_by_id(self, ids: Sequence[str]) -> list[dict]:
        """The snapshots with these `_id`s (those that exist)."""
        return self.find("local_models", {"_id": {"$in": list(ids)}})

    def latest_local_model(self, device_id: str) -> dict | None:
        """The newest snapshot of one device, or None."""
        return next(self.local_models_newest_first(device_id), None)

    def local_models_newest_first(self, device_id: str) -> Iterator[dict]:
        """One device's stored snapshots, highest version first, read lazily."""
        return iter(self.collection("local_models").find({"device_id": device_id}, sort=[("version", -1)],
                                                         batch_size=batch_size_for(MAX_DOCUMENT_BYTES)))

    def write_global_model(self, model: dict) -> bool:
        """Store a global model under its version; False (and nothing written) if that version exists already."""
        doc = {k: v for k, v in model.items() if k != "schema"} | {"_id": model["version"]}
        check_document("global_models", doc)
        try:
            result = self.collection("global_models").update_one({"_id": doc["_id"]}, {"$setOnInsert": doc},
                                                                 upsert=True)
        except PyMongoError as exc:
            raise _failure(exc, "writing a global model") from exc
        return result.upserted_id is not None

    def latest_global_model(self) -> dict | None:
        """The global model with the highest version, or None before the first round.

        A clustered round also stores one model per cluster under the same version (see `write_cluster_models`);
        the fleet-wide model (``_id`` = version) is the one returned.
        """
        top = self.collection("global_models").find_one(sort=[("version", -1)])
        if top is not None and top.get("cluster") is not None:
            top = self.global_model(top["version"])
        return top

    def global_model(self, version: int) -> dict | None:
        """The fleet-wide global model of `version`, or None."""
        return self.collection("global_models").find_one({"_id": version})

    def write_cluster_models(self, models: Iterable[dict]) -> int:
        """Store the per-cluster models of a clustered round: same `version` as the round's fleet model, `cluster`
        set, ``_id`` = ``"<version>:c<cluster>"`` (``"<version>:c<cluster>.<part>"`` for a cluster's further
        parts); first write wins. Returns how many were new."""
        docs = ({k: v for k, v in m.items() if k != "schema"}
                | {"_id": f"{m['version']}:c{m['cluster']}" + (f".{m['part']}" if m.get("part") else "")}
                for m in models)
        return len(self.insert_new("global_models", docs))

    def cluster_models(self, version: int) -> list[dict]:
        """The per-cluster models of a clustered round's `version`, by cluster number and part ([] for other
        strategies)."""
        return sorted(self.find("global_models", {"version": version, "cluster": {"$gte": 0}}),
                      key=lambda d: (d["cluster"], d.get("part", 0)))

    def aggregation_rounds(self, limit: int = 50) -> list[dict]:
        """The newest `limit` aggregation rounds, newest first."""
        return self.find("aggregation_history", sort=[("started_at", -1)], limit=limit)

    def aggregation_round(self, round_id: str) -> dict | None:
        """One aggregation round's document (``_id`` = `round_id`: a lookup, no scan, on the embedded FerretDB)."""
        return self.collection("aggregation_history").find_one({"_id": round_id})

    def write_aggregation_round(self, round_doc: dict) -> int:
        """Upsert one aggregation round (id = its `round_id`) into `aggregation_history`."""
        return self.upsert("aggregation_history", [{**round_doc, "_id": round_doc["round_id"]}])

    def write_metrics(self, docs: Iterable[dict]) -> int:
        """Upsert evaluation metrics; each document carries its own `_id` (e.g. ``<version>:<scope>:<device>``)."""
        return self.upsert("metrics", docs)

    # --- events -----------------------------------------------------------------------------------------------

    def write_dead_letters(self, letters: Iterable[dict]) -> int:
        """Store dead letters, each its own document: an `_id` a letter carries (the sink uses the refused
        message's Kafka position, so a replay does not duplicate it) is kept, others get a fresh one."""
        now = int(time.time() * 1000)
        docs = [{k: v for k, v in letter.items() if k != "schema"} | {"stored_at": now} for letter in letters]
        return len(self.insert_new("dead_letters", docs, need_id=False))

    def write_incidents(self, records: Iterable[dict]) -> int:
        """Store `flead.incident/1` records by `incident_id`: a later state (resolved, larger end) replaces an
        earlier one, an earlier one never replaces a later one. Returns how many documents were written."""
        now = int(time.time() * 1000)
        docs = [{k: v for k, v in r.items() if k != "schema"} | {"_id": r.get("incident_id"), "stored_at": now}
                for r in records]
        return self.store_incidents(docs)

    def store_incidents(self, docs: Iterable[dict]) -> int:
        """Store incident documents (``_id`` = incident_id, `stored_at` set) by rank (`incident_rank`) and merge
        the states written into the fleet overview's incident summary; returns how many were written."""
        written = self.replace_newer("incidents", docs, incident_rank)
        summaries.update_incidents(self, written)
        return len(written)

    def write_drift_events(self, records: Iterable[dict]) -> int:
        """Store `flead.drift/1` events by `event_id` (first write wins); returns how many were new."""
        now = int(time.time() * 1000)
        docs = [{k: v for k, v in r.items() if k != "schema"} | {"_id": r.get("event_id"), "stored_at": now}
                for r in records]
        return len(self.insert_new("drift_events", docs))

    # --- retention --------------------------------------------------------------------------------------------

    def prune(self, now_ms: int | None = None) -> dict[str, int]:
        """Delete what is past its horizon (`retention_cutoffs`); returns documents deleted per collection key."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        deleted = {}
        for key, cutoff in retention_cutoffs(self.cfg, now_ms).items():
            try:
                query = {RETENTION_FIELD.get(key, "stored_at"): {"$lt": cutoff}}
                deleted[key] = self.collection(key).delete_many(query).deleted_count
            except PyMongoError as exc:
                raise _failure(exc, f"pruning {self.cfg.mongo.collections[key]}") from exc
        if any(deleted.get(key) for key in summaries.SOURCES):
            summaries.rebuild(self)
        return deleted
