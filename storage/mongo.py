"""MongoDB access for FLEAD: connection, idempotent collection set-up, and repository functions.

Every write is keyed by the document's natural id (see docs/contracts.md), so replaying a record never
duplicates it; `score_rollups` sums only the score records new to `predictions`. Collection names come from
`mongo.collections` in the config; functions take the collection's *key* (``"predictions"``), not its name.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Iterable, Sequence

import pymongo
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from config import Config
from storage.schemas import INDEXES, SCHEMAS, SchemaViolation, check_document

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
UPSERT_CHUNK = 50  # FerretDB v1 stalls on larger bulk upserts

__all__ = ["connect", "init_db", "collection", "upsert_documents", "write_predictions", "write_device_data",
           "insert_new", "write_local_models", "latest_local_models", "write_global_model", "latest_global_model",
           "write_aggregation_round", "write_metrics", "write_dead_letters", "reading_id", "SchemaViolation",
           "StorageError", "latest_local_model_ids", "local_models_by_id", "global_model", "write_cluster_models",
           "cluster_models", "aggregation_rounds", "device_ids", "device_readings",
           "latest_local_model", "score_rollups", "add_to_rollups", "rebuild_rollups", "mongo_healthy"]


class StorageError(RuntimeError):
    """MongoDB could not be reached or refused an operation; the message says where and why."""


def connect(cfg: Config, timeout_ms: int = 5000) -> Database:
    """The configured database, after checking the server answers."""
    client = pymongo.MongoClient(cfg.mongo_uri, serverSelectionTimeoutMS=timeout_ms, tz_aware=True)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        raise StorageError(f"FLEAD_MONGO_URI: cannot connect to {cfg.mongo_uri} ({exc.__class__.__name__}); "
                           f"start the embedded server with `flead up` or point FLEAD_MONGO_URI at a MongoDB") from exc
    return client[cfg.mongo.database]


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


def collection(db: Database, cfg: Config, key: str):
    """The collection configured under `mongo.collections.<key>`."""
    return db[cfg.mongo.collections[key]]


def init_db(db: Database, cfg: Config) -> dict[str, bool]:
    """Create every collection with its validator (where the server supports them) and indexes; idempotent.

    Returns, per collection key, whether the server enforces the schema itself.
    """
    existing = set(db.list_collection_names())
    enforced: dict[str, bool] = {}
    for key, schema in SCHEMAS.items():
        name = cfg.mongo.collections[key]
        validator = {"$jsonSchema": schema}
        try:
            if name in existing:
                db.command({"collMod": name, "validator": validator, "validationLevel": "strict"})
            else:
                db.create_collection(name, validator=validator, validationLevel="strict")
            enforced[key] = True
        except OperationFailure as exc:
            if exc.code not in (238, 115):  # NotImplemented / CommandNotSupported (FerretDB v1)
                raise StorageError(f"creating collection {name}: {exc}") from exc
            if name not in existing and name not in db.list_collection_names():
                db.create_collection(name)
            enforced[key] = False  # check_document guards writes instead
        for keys, options in INDEXES[key]:
            db[name].create_index(keys, **options)
    return enforced


def reading_id(device_id: str, seq: int) -> str:
    """Natural id of anything about one reading: ``<device_id>:<seq>``."""
    return f"{device_id}:{seq}"


def _checked(key: str, docs: Iterable[dict]) -> list[dict]:
    """Validate a whole batch before anything is written, so a bad document never leaves half a batch."""
    docs = list(docs)
    for doc in docs:
        if "_id" not in doc:
            raise SchemaViolation(f"{key}: document without _id: {str(doc)[:120]}")
        check_document(key, doc)
    return docs


def insert_new(db: Database, cfg: Config, key: str, docs: Iterable[dict]) -> list[dict]:
    """Insert documents that carry their natural `_id`; ones already stored are kept (first write wins).

    Returns the documents that were new. Replays are therefore harmless. (Plain inserts, not upserts: FerretDB v1
    stalls on bulk upserts of more than ~100 documents and inserts are ~10x faster.)
    """
    docs = _checked(key, docs)
    new = []
    batch = cfg.mongo.write_batch_size
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        try:
            collection(db, cfg, key).insert_many(chunk, ordered=False)
            new.extend(chunk)
        except BulkWriteError as exc:
            errors = exc.details["writeErrors"]
            other = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if other:
                raise StorageError(f"writing to {cfg.mongo.collections[key]}: {other[0].get('errmsg')}") from exc
            stored_before = {e["index"] for e in errors}
            new.extend(doc for i, doc in enumerate(chunk) if i not in stored_before)
        except PyMongoError as exc:
            raise StorageError(f"writing {len(chunk)} documents to {cfg.mongo.collections[key]}: {exc}") from exc
    return new


def upsert_documents(db: Database, cfg: Config, key: str, docs: Iterable[dict]) -> int:
    """Validate and replace-or-insert documents by `_id` (last write wins); returns how many were written."""
    docs = _checked(key, docs)
    for start in range(0, len(docs), UPSERT_CHUNK):
        ops = [pymongo.ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs[start:start + UPSERT_CHUNK]]
        try:
            collection(db, cfg, key).bulk_write(ops, ordered=False)
        except PyMongoError as exc:
            raise StorageError(f"writing {len(ops)} documents to {cfg.mongo.collections[key]}: {exc}") from exc
    return len(docs)


def write_predictions(db: Database, cfg: Config, records: Sequence[dict]) -> tuple[int, int]:
    """Store score records in `predictions`, the anomalous ones also in `alerts`, and add the new ones to
    `score_rollups`; returns how many predictions and alerts were new.

    A record delivered twice is counted once: only records new to `predictions` reach the roll-ups. (If the
    process dies between the two writes, the roll-ups miss that batch's new records, as a replay finds them stored:
    `rebuild_rollups`, `flead sink rebuild-rollups`.)
    """
    docs = [{**r, "_id": reading_id(r.get("device_id"), r.get("seq"))} for r in records]  # checked on insert
    new = insert_new(db, cfg, "predictions", docs)
    add_to_rollups(db, cfg, score_rollups(new, cfg.mongo.rollup_bucket_s * 1000))
    return len(new), len(insert_new(db, cfg, "alerts", [d for d in docs if d["is_anomaly"]]))


def rebuild_rollups(db: Database, cfg: Config) -> tuple[int, int]:
    """Recompute `score_rollups` from `predictions` (after a sink died between its two writes, or a change of
    `mongo.rollup_bucket_s`); returns (predictions read, buckets written). Run it while the sink is stopped."""
    predictions = collection(db, cfg, "predictions").find(
        {}, {"device_id": 1, "ts": 1, "score": 1, "threshold": 1, "is_anomaly": 1})
    rollups = score_rollups(predictions, cfg.mongo.rollup_bucket_s * 1000)
    collection(db, cfg, "score_rollups").delete_many({})
    return sum(r["n"] for r in rollups), len(insert_new(db, cfg, "score_rollups", rollups))


def score_rollups(records: Iterable[dict], bucket_ms: int) -> list[dict]:
    """Score records summed per device and event-time bucket (``ts`` = the bucket's start): readings ``n``,
    ``anomalies``, ``score_sum`` and the largest ``score``, ``threshold`` and score of an anomaly.

    >>> [r["n"] for r in score_rollups([{"device_id": "a", "ts": t, "score": 1.0, "threshold": None,
    ...                                   "is_anomaly": False} for t in (0, 599_999, 600_000)], 600_000)]
    [2, 1]
    """
    buckets: dict[tuple[str, int], dict] = {}
    for r in records:
        start = r["ts"] - r["ts"] % bucket_ms
        b = buckets.get((r["device_id"], start))
        if b is None:
            b = buckets[(r["device_id"], start)] = {"_id": f"{r['device_id']}:{start}", "device_id": r["device_id"],
                                                    "ts": start, "n": 0, "anomalies": 0, "score_sum": 0.0,
                                                    "score_max": -math.inf}
        b["n"] += 1
        b["score_sum"] += r["score"]
        b["score_max"] = max(b["score_max"], r["score"])
        if r.get("threshold") is not None:
            b["threshold_max"] = max(b.get("threshold_max", -math.inf), r["threshold"])
        if r["is_anomaly"]:
            b["anomalies"] += 1
            b["anomaly_score_max"] = max(b.get("anomaly_score_max", -math.inf), r["score"])
    return list(buckets.values())


def add_to_rollups(db: Database, cfg: Config, rollups: Sequence[dict]) -> None:
    """Add `score_rollups` results to the stored buckets (counts and sums added, maxima kept). Buckets not
    stored yet are inserted, the others updated: FerretDB v1 runs upserts at ~100/s, inserts at ~10,000/s."""
    rollups = _checked("score_rollups", rollups)
    buckets, ids, batch = collection(db, cfg, "score_rollups"), [r["_id"] for r in rollups], cfg.mongo.write_batch_size
    stored = {d["_id"] for start in range(0, len(ids), batch)
              for d in buckets.find({"_id": {"$in": ids[start:start + batch]}}, {"_id": 1})}
    fresh = [r for r in rollups if r["_id"] not in stored]
    inserted = {d["_id"] for d in insert_new(db, cfg, "score_rollups", fresh)}
    ops = [pymongo.UpdateOne({"_id": r["_id"]}, {
        "$inc": {"n": r["n"], "anomalies": r["anomalies"], "score_sum": r["score_sum"]},
        "$max": {k: r[k] for k in ("score_max", "threshold_max", "anomaly_score_max") if k in r}})
        for r in rollups if r["_id"] not in inserted]  # stored before, or by another writer in between
    for start in range(0, len(ops), UPSERT_CHUNK):
        try:
            buckets.bulk_write(ops[start:start + UPSERT_CHUNK], ordered=False)
        except PyMongoError as exc:
            raise StorageError(f"updating {len(ops[start:start + UPSERT_CHUNK])} buckets of "
                               f"{cfg.mongo.collections.score_rollups}: {exc}") from exc


def write_device_data(db: Database, cfg: Config, readings: Iterable[dict]) -> int:
    """Store raw readings (``device_id, seq, ts, metrics[, label]``) in `device_data`; returns how many were new."""
    return len(insert_new(db, cfg, "device_data", ({**r, "_id": reading_id(r["device_id"], r["seq"])}
                                                   for r in readings)))


def device_ids(db: Database, cfg: Config) -> list[str]:
    """Every device with stored readings in `device_data`, sorted."""
    return sorted(collection(db, cfg, "device_data").distinct("device_id"))


def device_readings(db: Database, cfg: Config, device_id: str) -> list[dict]:
    """All stored readings of one device, by `seq`."""
    return list(collection(db, cfg, "device_data").find({"device_id": device_id}, {"_id": 0}).sort([("seq", 1)]))


def write_local_models(db: Database, cfg: Config, snapshots: Iterable[dict]) -> int:
    """Store weight snapshots in `local_models` (id ``<device_id>:<version>``); returns how many were new."""
    docs = ({k: v for k, v in s.items() if k != "schema"} | {"_id": f"{s.get('device_id')}:{s.get('version')}"}
            for s in snapshots)  # the schema check on insert names a missing field
    return len(insert_new(db, cfg, "local_models", docs))


def _created_between(since_ms: int | None, until_ms: int | None) -> dict:
    window = {}
    if since_ms is not None:
        window["$gt"] = since_ms
    if until_ms is not None:
        window["$lte"] = until_ms
    return {"created_at": window} if window else {}


def latest_local_models(db: Database, cfg: Config, since_ms: int | None = None,
                        until_ms: int | None = None) -> list[dict]:
    """The newest snapshot of each device (created after `since_ms`, at or before `until_ms`, if given), newest
    first."""
    latest: dict[str, dict] = {}
    cursor = collection(db, cfg, "local_models").find(_created_between(since_ms, until_ms)).sort(
        [("device_id", 1), ("version", -1)])
    for doc in cursor:
        latest.setdefault(doc["device_id"], doc)
    return sorted(latest.values(), key=lambda d: d["created_at"], reverse=True)


def latest_local_model_ids(db: Database, cfg: Config, since_ms: int | None = None,
                           until_ms: int | None = None) -> list[str]:
    """`_id` of the newest snapshot of each device in the window, without the weights (cheap for big fleets)."""
    latest: dict[str, str] = {}
    cursor = collection(db, cfg, "local_models").find(
        _created_between(since_ms, until_ms), {"_id": 1, "device_id": 1, "version": 1})
    for doc in cursor.sort([("device_id", 1), ("version", -1)]):
        latest.setdefault(doc["device_id"], doc["_id"])
    return sorted(latest.values())


def local_models_by_id(db: Database, cfg: Config, ids: Sequence[str]) -> list[dict]:
    """The snapshots with these `_id`s (those that exist)."""
    return list(collection(db, cfg, "local_models").find({"_id": {"$in": list(ids)}}))


def latest_local_model(db: Database, cfg: Config, device_id: str) -> dict | None:
    """The newest snapshot of one device, or None."""
    return collection(db, cfg, "local_models").find_one({"device_id": device_id}, sort=[("version", -1)])


def write_global_model(db: Database, cfg: Config, model: dict) -> bool:
    """Store a global model under its version; False (and nothing written) if that version exists already."""
    doc = {k: v for k, v in model.items() if k != "schema"} | {"_id": model["version"]}
    check_document("global_models", doc)
    result = collection(db, cfg, "global_models").update_one({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
    return result.upserted_id is not None


def latest_global_model(db: Database, cfg: Config) -> dict | None:
    """The global model with the highest version, or None before the first round.

    A clustered round also stores one model per cluster under the same version (see `write_cluster_models`);
    the fleet-wide model (``_id`` = version) is the one returned.
    """
    top = collection(db, cfg, "global_models").find_one(sort=[("version", -1)])
    if top is not None and top.get("cluster") is not None:
        top = global_model(db, cfg, top["version"])
    return top


def global_model(db: Database, cfg: Config, version: int) -> dict | None:
    """The fleet-wide global model of `version`, or None."""
    return collection(db, cfg, "global_models").find_one({"_id": version})


def write_cluster_models(db: Database, cfg: Config, models: Iterable[dict]) -> int:
    """Store the per-cluster models of a clustered round: same `version` as the round's fleet model, `cluster`
    set, ``_id`` = ``"<version>:c<cluster>"``; first write wins. Returns how many were new."""
    docs = ({k: v for k, v in m.items() if k != "schema"} | {"_id": f"{m['version']}:c{m['cluster']}"}
            for m in models)
    return len(insert_new(db, cfg, "global_models", docs))


def cluster_models(db: Database, cfg: Config, version: int) -> list[dict]:
    """The per-cluster models of a clustered round's `version`, by cluster number ([] for other strategies)."""
    return list(collection(db, cfg, "global_models").find({"version": version, "cluster": {"$gte": 0}})
                .sort([("cluster", 1)]))


def aggregation_rounds(db: Database, cfg: Config, limit: int = 50) -> list[dict]:
    """The newest `limit` aggregation rounds, newest first."""
    return list(collection(db, cfg, "aggregation_history").find().sort([("started_at", -1)]).limit(limit))


def write_aggregation_round(db: Database, cfg: Config, round_doc: dict) -> int:
    """Upsert one aggregation round (id = its `round_id`) into `aggregation_history`."""
    return upsert_documents(db, cfg, "aggregation_history", [{**round_doc, "_id": round_doc["round_id"]}])


def write_metrics(db: Database, cfg: Config, docs: Iterable[dict]) -> int:
    """Upsert evaluation metrics; each document carries its own `_id` (e.g. ``<version>:<scope>:<device>``)."""
    return upsert_documents(db, cfg, "metrics", docs)


def write_dead_letters(db: Database, cfg: Config, letters: Iterable[dict]) -> int:
    """Store dead letters; the id hashes source, reason and raw text, so a replay does not duplicate them."""
    docs = []
    for letter in letters:
        identity = f"{letter.get('source')}\0{letter.get('reason')}\0{letter.get('raw')}"
        digest = hashlib.sha1(identity.encode()).hexdigest()
        docs.append({k: v for k, v in letter.items() if k != "schema"} | {"_id": digest})
    return len(insert_new(db, cfg, "dead_letters", docs))
