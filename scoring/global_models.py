"""The global models a stream worker holds, and which one a device adopts.

Every worker sees every global model (they arrive on a broadcast stream). The aggregator publishes one fleet model
per round and, for a clustered round, one model per cluster under the same version; a device adopts the newest
model of its own cluster if there is one, else the newest fleet model.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np

from models.serialization import SerializationError, from_b64, loads
from telemetry.schema import GLOBAL_MODEL, InvalidMessage

FLEET = ""  # key of the fleet-wide model (a global model without a cluster)


class GlobalModel(NamedTuple):
    """One global model as a worker keeps it (also the value of the job's broadcast state)."""

    version: int
    weights: list[np.ndarray]
    assignments: dict  # device id -> cluster, for a cluster's model; empty for the fleet model


def decode_global_model(raw: bytes | str) -> tuple[str, GlobalModel]:
    """(cluster key, model) of a `flead.global-model/1` record; `InvalidMessage` with the reason if it is not a
    usable model (wrong shape of record, version < 1, undecodable or tampered weights, non-finite values)."""
    record = GLOBAL_MODEL.decode(raw)
    if record["version"] < 1:
        raise InvalidMessage(f"version: expected an integer >= 1, got {record['version']}")
    try:
        weights, _ = loads(from_b64(record["weights"]))
    except (SerializationError, ValueError) as exc:
        raise InvalidMessage(f"weights: {exc}") from None
    if not all(np.isfinite(w).all() for w in weights):
        raise InvalidMessage("weights: non-finite values")
    cluster = FLEET if record.get("cluster") is None else str(record["cluster"])
    return cluster, GlobalModel(record["version"], weights, record.get("assignments") or {})


class GlobalModels:
    """The newest global model of each cluster (and of the fleet) a worker has seen."""

    def __init__(self, models: Iterable[tuple[str, GlobalModel]] = ()):
        self.by_cluster: dict[str, GlobalModel] = {cluster: GlobalModel(*model) for cluster, model in models}

    def offer(self, cluster: str, model: GlobalModel) -> bool:
        """Keep `model` if it is newer than the one held for its cluster; True if it was kept."""
        held = self.by_cluster.get(cluster)
        if held is not None and held.version >= model.version:
            return False
        self.by_cluster[cluster] = model
        return True

    def newest_for(self, device_id: str) -> GlobalModel | None:
        """The newest model of the device's cluster (a clustered round assigned it one), unless a newer fleet model
        came after it (the aggregator stopped clustering); else the fleet model; None before any model."""
        fleet = self.by_cluster.get(FLEET)
        own = [model for cluster, model in self.by_cluster.items()
               if cluster != FLEET and str(model.assignments.get(device_id)) == cluster]
        if not own:
            return fleet
        newest_own = max(own, key=lambda model: model.version)
        return newest_own if fleet is None or newest_own.version >= fleet.version else fleet
