"""What `/metrics` reads from MongoDB: one method per figure, so a change of storage layout changes one method.

Counts of readings come from `score_rollups` (per device and time bucket: ``n``, ``anomalies``, maxima), which the
storage keeps whatever the layout of `predictions`; nothing here reads `predictions` or `device_data`.

FerretDB v1 computes only the first accumulator of a ``$group`` stage (a second ``$sum`` comes back 0) and has no
``$max``/``$first`` there, so every grouped figure is one pipeline with one ``$sum`` (`group_sum`).
"""
from __future__ import annotations

from typing import Any, NamedTuple


from config import Config
from storage.mongo import Store


def group_sum(collection, key: str, value: Any = 1, match: dict | None = None) -> dict[Any, float]:
    """``{key value: sum of value}`` over the documents matching `match` (``value`` a field path like ``"$n"``, or 1
    to count)."""
    stages: list[dict] = [{"$match": match}] if match else []
    stages.append({"$group": {"_id": f"${key}", "total": {"$sum": value}}})
    return {doc["_id"]: doc["total"] for doc in collection.aggregate(stages)}


class DeviceSummary(NamedTuple):
    """One device in the roll-ups: totals, and its newest bucket (``ts``, ``n``, ``score_sum``, ``score_max``,
    ``threshold_max`` — absent while the device warms up)."""

    readings: int
    anomalies: int
    latest: dict


class PipelineReader:
    """The pipeline's figures as stored in MongoDB (see the module docstring)."""

    def __init__(self, db: Store, cfg: Config):
        self.db = db
        self.cfg = cfg

    def _collection(self, key: str):
        return self.db.collection(key)

    def devices(self) -> dict[str, DeviceSummary]:
        """Per device: readings scored and anomalies (all time) and its newest roll-up bucket. One pass over the
        roll-ups: FerretDB uses no index to sort per device (a query per device took seconds), and two
        single-accumulator ``$group`` pipelines (see the module docstring) would each cost that pass."""
        out: dict[str, DeviceSummary] = {}
        fields = {"_id": 0, "device_id": 1, "ts": 1, "n": 1, "anomalies": 1, "score_sum": 1, "score_max": 1,
                  "threshold_max": 1}
        for doc in self._collection("score_rollups").find({}, fields):
            held = out.get(doc["device_id"])
            if held is None:
                out[doc["device_id"]] = DeviceSummary(doc["n"], doc["anomalies"], doc)
            else:
                newer = doc if doc["ts"] > held.latest["ts"] else held.latest
                out[doc["device_id"]] = DeviceSummary(held.readings + doc["n"], held.anomalies + doc["anomalies"],
                                                      newer)
        return out

    def dead_letters_by_reason(self) -> dict[str, int]:
        return {str(reason): int(n) for reason, n in group_sum(self._collection("dead_letters"), "reason").items()}

    def incidents_by_status(self) -> dict[str, int]:
        return {str(status): int(n) for status, n in group_sum(self._collection("incidents"), "status").items()}

    def incidents_never_paged(self) -> int:
        """Resolved incidents the router held back: fewer than `router.notify_min_flagged` flagged readings and a
        peak below `router.critical_ratio` × threshold (`monitoring.notifications.worth_notifying`, as a query)."""
        router = self.cfg.router
        return self._collection("incidents").count_documents(
            {"status": "resolved", "n_flagged": {"$lt": router.notify_min_flagged},
             "$or": [{"peak_ratio": {"$lt": router.critical_ratio}}, {"peak_ratio": None}]})

    def drift_events(self) -> int:
        return self._collection("drift_events").estimated_document_count()

    def feedback_by_verdict(self) -> dict[str, int]:
        return {str(v): int(n) for v, n in group_sum(self._collection("incident_feedback"), "verdict").items()}

    def last_round(self) -> dict | None:
        rounds = self.db.aggregation_rounds(limit=1)
        return rounds[0] if rounds else None

    def latest_global_version(self) -> int | None:
        model = self.db.latest_global_model()
        return model["version"] if model else None

    def devices_by_global_version(self, since_ms: int) -> dict[int, int]:
        """Devices that sent a weight snapshot after `since_ms`, counted by the global version of their newest."""
        newest: dict[str, tuple[int, int]] = {}
        cursor = self._collection("local_models").find({"created_at": {"$gt": since_ms}},
                                                       {"device_id": 1, "version": 1, "global_version": 1, "_id": 0})
        for doc in cursor:
            held = newest.get(doc["device_id"])
            if held is None or doc["version"] > held[0]:
                newest[doc["device_id"]] = (doc["version"], doc.get("global_version") or 0)
        counts: dict[int, int] = {}
        for _, global_version in newest.values():
            counts[global_version] = counts.get(global_version, 0) + 1
        return counts

    def deliveries_by_state(self) -> dict[tuple[str, str], int]:
        """Deliveries per (receiver kind, state)."""
        deliveries = self._collection("deliveries")
        out = {}
        for kind in group_sum(deliveries, "kind"):
            for state, n in group_sum(deliveries, "state", match={"kind": kind}).items():
                out[(str(kind), str(state))] = int(n)
        return out

    def suppression_rules(self) -> int:
        return self._collection("suppressions").estimated_document_count()
