"""What a stream worker holds from the broadcast topics: global models, secure-aggregation cohorts, feedback.

Every worker sees every record of the global-model topic (models of the aggregator and, with secure aggregation,
its `flead.cohort/1` announcements) and of the feedback topic (operators' verdicts on incidents). Each kept record
is also put in Flink's broadcast state under a key of `Broadcasts.state_key` (so a restore brings it back), and
`Broadcasts(entries)` rebuilds the worker's view from those entries.

The aggregator publishes one fleet model per round and, for a clustered round, one model per cluster under the same
version (in parts when its member list is long: the parts' members add up); a device adopts the newest model of its
own cluster if there is one, else the newest fleet model.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple

import numpy as np

from models.serialization import SerializationError, from_b64, loads
from telemetry.schema import InvalidMessage

FLEET = ""  # cluster key of the fleet-wide model (a global model without a cluster)
MODEL, COHORT, FEEDBACK = "model:", "cohort", "feedback:"  # broadcast-state key prefixes


def member_key(device_id: str) -> int:
    """A device id's 64-bit key in a member list (the first 8 bytes of its BLAKE2b digest)."""
    return int.from_bytes(hashlib.blake2b(device_id.encode(), digest_size=8).digest(), "little")


def member_keys(members: Any) -> np.ndarray:
    """A cluster's member list as a worker holds it: the sorted, unique `member_key`s of its device ids (8 bytes a
    member, where a set of id strings takes ~100: ~8 MB per worker and checkpoint for a million devices). Takes
    device ids, or keys already made (a restored entry)."""
    if isinstance(members, np.ndarray):
        return np.unique(members.astype(np.uint64))
    keys = np.fromiter((member_key(m) for m in members if isinstance(m, str)), dtype=np.uint64)
    return np.unique(keys)


def holds(keys: np.ndarray, key: int) -> bool:
    """Whether the sorted `keys` of a member list hold `key`."""
    at = int(np.searchsorted(keys, np.uint64(key)))
    return at < len(keys) and int(keys[at]) == key


class GlobalModel(NamedTuple):
    """One global model as a worker keeps it."""

    version: int
    weights: list[np.ndarray]
    members: np.ndarray  # `member_keys` of the devices that adopt a cluster's model; empty for the fleet model

    @classmethod
    def of_entry(cls, entry: tuple) -> "GlobalModel":
        """The model of a broadcast-state entry's value (`model_entry`), also of a state written when members were
        kept as a set of ids."""
        version, weights, members = entry
        return cls(version, weights, member_keys(members))


def global_model_of(record: dict) -> tuple[str, GlobalModel]:
    """(cluster key, model) of a verified `flead.global-model/1` record; `InvalidMessage` if its weights are not a
    usable model (undecodable or tampered blob, non-finite values)."""
    try:
        weights, _ = loads(from_b64(record["weights"]))
    except (SerializationError, ValueError) as exc:
        raise InvalidMessage(f"weights: {exc}") from None
    if not all(np.isfinite(w).all() for w in weights):
        raise InvalidMessage("weights: non-finite values")
    cluster = FLEET if record.get("cluster") is None else str(record["cluster"])
    return cluster, GlobalModel(record["version"], weights, member_keys(record.get("members") or ()))


class GlobalModels:
    """The newest global model of each cluster (and of the fleet) a worker has seen."""

    def __init__(self, models: Iterable[tuple[str, GlobalModel]] = ()):
        self.by_cluster: dict[str, GlobalModel] = {}
        for cluster, model in models:
            self.offer(cluster, GlobalModel.of_entry(model))

    def held_version(self, cluster: str) -> int:
        held = self.by_cluster.get(cluster)
        return 0 if held is None else held.version

    def newest_version(self) -> int | None:
        """The newest version of any cluster (None before the first model)."""
        return max((m.version for m in self.by_cluster.values()), default=None)

    def offer(self, cluster: str, model: GlobalModel) -> bool:
        """Keep `model` if it is newer than the one held for its cluster, or add its members to the held model of
        the same version (a cluster's model comes in parts); True if anything changed."""
        held = self.by_cluster.get(cluster)
        if held is not None and held.version == model.version:
            if np.isin(model.members, held.members, assume_unique=True).all():
                return False
            self.by_cluster[cluster] = held._replace(members=np.union1d(held.members, model.members))
            return True
        if self.held_version(cluster) >= model.version:
            return False
        self.by_cluster[cluster] = model
        return True

    def newest_for(self, device_id: str) -> GlobalModel | None:
        """The newest model of the device's cluster (a clustered round assigned it one), unless a newer fleet model
        came after it (the aggregator stopped clustering); else the fleet model; None before any model."""
        fleet = self.by_cluster.get(FLEET)
        if len(self.by_cluster) == (fleet is not None):
            return fleet
        key = member_key(device_id)
        own = [model for cluster, model in self.by_cluster.items()
               if cluster != FLEET and holds(model.members, key)]
        if not own:
            return fleet
        newest_own = max(own, key=lambda model: model.version)
        return newest_own if fleet is None or newest_own.version >= fleet.version else fleet


class Broadcasts:
    """A worker's view of the broadcast topics: `models`, the newest secure-aggregation `cohort` announcement, and
    operators' `feedback` per device (the newest verdict per incident, at most `max_feedback` incidents)."""

    def __init__(self, entries: Iterable[tuple[str, Any]] = (), max_feedback: int = 8):
        self.models = GlobalModels()
        self.cohort: dict | None = None
        self.feedback: dict[str, dict[str, dict]] = {}
        self.max_feedback = max_feedback
        for key, value in entries:
            self.restore(key, value)

    def restore(self, key: str, value: Any) -> None:
        """Take back one broadcast-state entry (`state_key`, value) after a restore."""
        if key.startswith(MODEL):
            self.models.offer(key[len(MODEL):], GlobalModel.of_entry(value))
        elif key == COHORT:
            self.cohort = value
        elif key.startswith(FEEDBACK):
            self.feedback[key[len(FEEDBACK):]] = dict(value)

    def keep_cohort(self, record: dict) -> tuple[str, dict] | None:
        """Keep a verified cohort announcement unless the one held is newer; the state entry, or None."""
        if self.cohort is not None and self.cohort.get("created_at", 0) > record.get("created_at", 0):
            return None
        self.cohort = record
        return COHORT, record

    def keep_feedback(self, record: dict) -> tuple[str, dict] | None:
        """Keep a verified verdict on one of a device's incidents (the newest per incident wins; the device keeps
        its `max_feedback` newest incidents); the state entry, or None if it changed nothing."""
        device = self.feedback.setdefault(record["device_id"], {})
        held = device.get(record["incident_id"])
        if held is not None and held["created_at"] >= record["created_at"]:
            return None
        device[record["incident_id"]] = record
        if len(device) > self.max_feedback:
            oldest = min(device.values(), key=lambda r: r["created_at"])
            del device[oldest["incident_id"]]
        return FEEDBACK + record["device_id"], device

    def feedback_for(self, device_id: str) -> list[dict]:
        """The device's verdicts, oldest first."""
        return sorted(self.feedback.get(device_id, {}).values(), key=lambda r: (r["created_at"], r["incident_id"]))


def model_entry(cluster: str, model: GlobalModel) -> tuple[str, tuple]:
    """The broadcast-state entry of a kept global model."""
    return MODEL + cluster, tuple(model)
