"""Delivery state of the incident router in MongoDB (collection `mongo.collections.deliveries`): an outbox.

One document per receiver, incident and status, ``_id`` = its idempotency key (`notifications.delivery_id`).
The router inserts them before it commits the incident record's Kafka offset, so a crash between the two replays
the record onto documents that exist already: each incident state is delivered once per receiver, and a crash after
the document was written but before it was sent still sends it (at-least-once, the key lets a receiver drop a
repeat). States: ``pending`` → ``delivered``, or ``dead`` (after the last retry, or a refusal), or ``suppressed``.

    {"_id": "webhook-3f..|dev-1:100|open", "receiver": "webhook-3f..", "kind": "webhook", "url": "...",
     "incident_id": "dev-1:100", "device_id": "dev-1", "status": "open", "state": "pending", "attempts": 0,
     "next_attempt_at": <ms>, "lease_until": 0, "created_at": <ms>, "updated_at": <ms>, "delivered_at": null,
     "last_error": null, "incident": {<the record>}, "labels": {<Alertmanager labels>} | null,
     "suppressed_by": <rule id> | null, "resolved": false, "resend_at": null}

The collections the operator integrations own (deliveries, incident_feedback, suppressions) get their indexes from
`ensure_collections`.
"""
from __future__ import annotations

from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from config import Config
from storage.mongo import Store

PENDING, DELIVERED, DEAD, SUPPRESSED = "pending", "delivered", "dead", "suppressed"

INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "deliveries": [[("state", 1), ("next_attempt_at", 1)], [("incident_id", 1)],
                   [("status", 1), ("resolved", 1), ("resend_at", 1)]],
    "incident_feedback": [[("device_id", 1), ("updated_at", -1)], [("verdict", 1)]],
    "suppressions": [[("device_id", 1)]],
}


def ensure_collections(db: Database, cfg: Config) -> None:
    """Create the operator integrations' collections and indexes (idempotent)."""
    existing = set(db.list_collection_names())
    for key, indexes in INDEXES.items():
        name = cfg.mongo.collections[key]
        if name not in existing:
            db.create_collection(name)
        for keys in indexes:
            db[name].create_index(keys)


class DeliveryStore:
    """The router's outbox (see the module docstring); `now` arguments are epoch ms."""

    def __init__(self, db: Store, cfg: Config):
        self.deliveries = db.collection("deliveries")

    def get(self, delivery_id: str) -> dict | None:
        return self.deliveries.find_one({"_id": delivery_id})

    def add(self, doc: dict) -> bool:
        """Insert a new delivery; False if one with this idempotency key exists (a replayed incident state)."""
        try:
            self.deliveries.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    def refresh_incident(self, delivery_id: str, incident: dict, now: int) -> None:
        """Keep the newest state of a still-open incident on its open delivery (re-sends carry it)."""
        self.deliveries.update_one({"_id": delivery_id, "incident.end_seq": {"$lte": incident["end_seq"]}},
                                   {"$set": {"incident": incident, "updated_at": now}})

    def mark_resolved(self, delivery_id: str, now: int) -> None:
        """The incident of this open delivery resolved: stop re-sending it."""
        self.deliveries.update_one({"_id": delivery_id}, {"$set": {"resolved": True, "resend_at": None,
                                                                  "updated_at": now}})

    def due(self, now: int, limit: int) -> list[str]:
        """The ids of up to `limit` pending deliveries that are due and not leased, oldest first. One sorted query
        per batch: FerretDB sorts without its indexes, so a sorted claim per delivery would cost a scan of the
        outbox each (measured: 150-230 ms per delivery with 130 pending, growing with the backlog)."""
        due = self.deliveries.find({"state": PENDING, "next_attempt_at": {"$lte": now}, "lease_until": {"$lte": now}},
                                   {"_id": 1})
        return [d["_id"] for d in due.sort([("next_attempt_at", pymongo.ASCENDING),
                                            ("created_at", pymongo.ASCENDING)]).limit(limit)]

    def claim(self, delivery_id: str, now: int, lease_ms: int) -> dict | None:
        """Take one delivery `due` listed for `lease_ms`; None if it is no longer due (another router took it, or it
        was postponed). The lease keeps a second router from sending it meanwhile; an expired lease (a router died
        mid-send) frees it."""
        return self.deliveries.find_one_and_update(
            {"_id": delivery_id, "state": PENDING, "next_attempt_at": {"$lte": now}, "lease_until": {"$lte": now}},
            {"$set": {"lease_until": now + lease_ms}}, return_document=ReturnDocument.AFTER)

    def postpone(self, delivery_id: str, until: int) -> None:
        self.deliveries.update_one({"_id": delivery_id}, {"$set": {"next_attempt_at": until, "lease_until": 0}})

    def delivered(self, delivery: dict, now: int, resend_at: int | None) -> None:
        self.deliveries.update_one({"_id": delivery["_id"]}, {"$set": {
            "state": DELIVERED, "attempts": delivery["attempts"] + 1, "delivered_at": now, "updated_at": now,
            "lease_until": 0, "last_error": None, "resend_at": resend_at}})

    def failed(self, delivery: dict, now: int, error: str, next_attempt_at: int | None) -> None:
        """A failed attempt: pending again at `next_attempt_at`, or dead when that is None."""
        update: dict[str, Any] = {"attempts": delivery["attempts"] + 1, "last_error": error, "updated_at": now,
                                  "lease_until": 0}
        if next_attempt_at is None:
            update["state"] = DEAD
        else:
            update["next_attempt_at"] = next_attempt_at
        self.deliveries.update_one({"_id": delivery["_id"]}, {"$set": update})

    def due_resends(self, now: int, limit: int = 100) -> list[dict]:
        """Delivered open incidents (Alertmanager) whose re-send time has come."""
        return list(self.deliveries.find({"status": "open", "state": DELIVERED, "resolved": False,
                                          "resend_at": {"$ne": None, "$lte": now}}).limit(limit))

    def resent(self, delivery_id: str, now: int, resend_at: int, error: str | None) -> None:
        self.deliveries.update_one({"_id": delivery_id, "resolved": False},
                                   {"$set": {"resend_at": resend_at, "updated_at": now, "last_error": error}})

    def retry_dead(self, now: int) -> int:
        """Make every dead delivery pending again (after a receiver was fixed); returns how many."""
        result = self.deliveries.update_many({"state": DEAD}, {"$set": {
            "state": PENDING, "attempts": 0, "next_attempt_at": now, "lease_until": 0, "updated_at": now}})
        return result.modified_count
