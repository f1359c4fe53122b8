"""One federated aggregation round: MongoDB snapshots → decode and check on Spark → strategy → MongoDB + Kafka.

    spark-submit spark_jobs/aggregate_job.py                 # master: spark-submit's default, local[*]
    spark-submit --master spark://host:7077 spark_jobs/aggregate_job.py

Read top to bottom (`run_round`):

1. Window. The round takes each device's newest snapshot created after the previous global model's
   ``created_at`` and at or before the round's start (its cut-off). The new model's ``created_at`` is that
   cut-off, so every snapshot falls into exactly one round, and a re-run with nothing new writes nothing.
2. Spark. The ids of those snapshots are spread over `aggregation.spark_partitions` partitions; each partition
   fetches its snapshots from MongoDB and decodes and checks each one on its own (base64, blob integrity,
   layers and shapes against the current global model, finite values, positive n_samples).
3. Driver. The decoded updates (a few MB) are collected and aggregated in NumPy by the configured strategy,
   which adds the checks that need the whole cohort (majority shapes in the first round, norm ratio, cosine to
   the median). Collect-then-NumPy beat every distributed reduction we measured (see PLATFORM-NOTES).
4. Output. `global_models`: version n+1 (``_id`` = version, the fleet-wide model). A clustered round also
   stores one model per cluster under the SAME version, ``_id`` ``"<version>:c<k>"``, ``cluster`` = k,
   ``participants`` = the cluster's members: versions stay one per round, the newest fleet model is always
   ``_id`` = highest version, and a device finds its cluster's model by membership. `aggregation_history`
   gets the round (``_id`` = ``r<version>``); the models go to the global-model topic as
   `flead.global-model/1` messages (fleet model first, then the clusters').
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from config import Config  # noqa: E402
from models.aggregation import AggregationError, FedAvg, Update, make_strategy, validate_updates  # noqa: E402
from models.serialization import SerializationError, dumps, from_b64, loads, to_b64  # noqa: E402
from storage import mongo  # noqa: E402

log = logging.getLogger("flead.aggregate")
GLOBAL_MODEL_SCHEMA = "flead.global-model/1"


@dataclass
class RoundOutcome:
    """What one call of `run_round` did: ``aggregated``, ``skipped`` (nothing or too little to aggregate) or
    ``exists`` (another run wrote this version first)."""

    status: str
    message: str
    version: int | None = None
    round_id: str | None = None
    n_participants: int = 0
    rejected: list[dict] = field(default_factory=list)
    published: bool = False
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- executors

def decode_snapshot(doc: dict, reference_shapes: list[tuple[int, ...]] | None) -> dict:
    """Decode one snapshot document and check it on its own; ``problem`` says why it cannot take part."""
    row = {"device_id": doc["device_id"], "version": doc.get("version", 0), "n_samples": doc.get("n_samples"),
           "loss": doc.get("loss"), "weights": None, "architecture": None, "problem": None}
    try:
        weights, meta = loads(from_b64(doc["weights"]))
    except SerializationError as exc:
        row["problem"] = f"weights: {exc}"
        return row
    shapes = reference_shapes or [w.shape for w in weights]
    _, rejected, _ = validate_updates([Update(row["device_id"], weights, row["n_samples"])], shapes,
                                      max_norm_ratio=math.inf, min_cosine=None)
    if rejected:
        row["problem"] = rejected[0][1]
    else:
        row["weights"], row["architecture"] = weights, meta.get("architecture")
    return row


def decode_partition(cfg_values: dict, reference_shapes, snapshot_ids):
    """Executor side: fetch this partition's snapshots from MongoDB and decode each one."""
    ids = list(snapshot_ids)
    if not ids:
        return
    cfg = Config(cfg_values)
    db = mongo.connect(cfg)
    try:
        for doc in mongo.local_models_by_id(db, cfg, ids):
            yield decode_snapshot(doc, reference_shapes)
    finally:
        db.client.close()


# ---------------------------------------------------------------- driver

def norm_summary(norms: dict[str, float]) -> dict[str, float] | None:
    """min / median / mean / max of the update norms (None without any)."""
    if not norms:
        return None
    values = np.array(list(norms.values()))
    return {"min": float(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
            "max": float(values.max())}


def configured_strategy(cfg: Config, reference_shapes, previous: dict | None):
    """`make_strategy`, with DP accounting resumed from the previous round and fresh noise each round."""
    strategy = make_strategy(cfg, reference_shapes)
    if isinstance(strategy, FedAvg) and strategy.privacy is not None:
        from models.privacy import DPFedAvgMechanism
        version = previous["version"] + 1 if previous else 1
        strategy.privacy = DPFedAvgMechanism(
            clip_norm=cfg.privacy.clip_norm, noise_multiplier=cfg.privacy.noise_multiplier, delta=cfg.privacy.delta,
            seed=cfg.model.seed * 1_000_003 + version, rounds_done=(previous or {}).get("dp_rounds", 0))
    return strategy


def aggregate(strategy, updates: list[Update], current: list[np.ndarray] | None):
    """`strategy.aggregate`; DP-FedAvg also gets the current global model to clip deltas from. In the first
    round there is none, so whole models are clipped (from zero), which bounds sensitivity all the same."""
    if not (isinstance(strategy, FedAvg) and strategy.privacy is not None):
        return strategy.aggregate(updates)
    if current is None and updates:
        current = [np.zeros_like(w) for w in updates[0].weights]
    return strategy.aggregate(updates, current=current)


def publish(cfg: Config, messages: list[dict]) -> None:
    """Send `flead.global-model/1` messages to the global-model topic; raises if any is not acknowledged."""
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "message.max.bytes": 10_000_000})
    for message in messages:
        producer.produce(cfg.kafka.topics.global_model, key=str(message["version"]).encode(),
                         value=json.dumps(message).encode(),
                         on_delivery=lambda err, _msg: err and errors.append(str(err)))
    if producer.flush(30) or errors:
        raise KafkaException(f"{cfg.kafka.topics.global_model} at {cfg.kafka_bootstrap}: "
                             f"{errors[0] if errors else 'not all messages acknowledged within 30 s'}")


def run_round(spark, cfg: Config, publish_model: bool = True) -> RoundOutcome:
    """One aggregation round (see the module docstring); never writes a version twice."""
    started = now_ms()
    clock = time.perf_counter()
    db = mongo.connect(cfg)
    try:
        previous = mongo.latest_global_model(db, cfg)
        since = previous["created_at"] if previous else None
        base_version = previous["version"] if previous else 0
        ids = mongo.latest_local_model_ids(db, cfg, since, started)
        if not ids:
            since_what = f"since global model v{base_version}" if previous else "stored yet"
            return RoundOutcome("skipped", f"no new snapshots {since_what}; nothing to do",
                                duration_s=time.perf_counter() - clock)
        current = loads(from_b64(previous["weights"]))[0] if previous else None
        reference_shapes = [w.shape for w in current] if current else None

        rows = (spark.sparkContext.parallelize(ids, max(1, min(len(ids), cfg.aggregation.spark_partitions)))
                .mapPartitions(partial(decode_partition, cfg.to_dict(), reference_shapes)).collect())
        decoded_at = time.perf_counter()
        rejected = [(r["device_id"], r["problem"]) for r in rows if r["problem"]]
        decoded = [r for r in rows if not r["problem"]]
        updates = [Update(r["device_id"], r["weights"], int(r["n_samples"]), int(r["version"])) for r in decoded]
        strategy = configured_strategy(cfg, reference_shapes, previous)
        try:
            result = aggregate(strategy, updates, current)
        except AggregationError as exc:
            early = "; ".join(f"{d}: {r}" for d, r in rejected)
            return RoundOutcome("skipped", f"round skipped: {exc}" + (f"; undecodable: {early}" if early else ""),
                                rejected=[{"device_id": d, "reason": r} for d, r in rejected],
                                duration_s=time.perf_counter() - clock)
        aggregated_at = time.perf_counter()

        version, round_id = base_version + 1, f"r{base_version + 1}"
        rejected += result.rejected
        rejected_docs = [{"device_id": d, "reason": r} for d, r in rejected]
        by_device = {r["device_id"]: r for r in decoded}
        architecture = Counter(by_device[d]["architecture"] for d in result.participants).most_common(1)[0][0]
        model = {"schema": GLOBAL_MODEL_SCHEMA, "version": version, "round_id": round_id,
                 "strategy": result.strategy, "participants": result.participants, "rejected": rejected_docs,
                 "n_samples": result.n_samples, "created_at": started, "dp_epsilon": result.extra.get("dp_epsilon"),
                 "cluster": None, "norms": norm_summary(result.norms),
                 "weights": to_b64(dumps(result.weights, {"architecture": architecture, "model_version": version}))}
        if result.extra.get("dp_epsilon") is not None:
            model["dp_rounds"] = strategy.privacy.rounds_done
        cluster_docs = []
        if "cluster_weights" in result.extra:
            members: dict[int, list[str]] = {}
            for device, k in result.extra["clusters"].items():
                members.setdefault(k, []).append(device)
            model["cluster_sizes"] = [len(members.get(k, [])) for k in range(len(result.extra["cluster_weights"]))]
            for k, weights in enumerate(result.extra["cluster_weights"]):
                cluster_docs.append({**model, "cluster": k, "participants": members.get(k, []),
                                     "n_samples": int(sum(by_device[d]["n_samples"] for d in members.get(k, []))),
                                     "weights": to_b64(dumps(weights, {"architecture": architecture,
                                                                       "model_version": version, "cluster": k}))})
        if not mongo.write_global_model(db, cfg, model):
            return RoundOutcome("exists", f"global model v{version} was written by another run meanwhile; "
                                          "nothing written", version=version, round_id=round_id,
                                duration_s=time.perf_counter() - clock)
        mongo.write_cluster_models(db, cfg, cluster_docs)

        outcome = RoundOutcome("aggregated", "", version=version, round_id=round_id,
                               n_participants=len(result.participants), rejected=rejected_docs)
        if publish_model:
            try:
                publish(cfg, [model, *cluster_docs])
                outcome.published = True
            except Exception as exc:  # the model is stored; consumers can still fetch it from MongoDB or the API
                log.error("global model v%d stored but not published: %s", version, exc)
        losses = [by_device[d]["loss"] for d in result.participants
                  if isinstance(by_device[d]["loss"], (int, float)) and math.isfinite(by_device[d]["loss"])]
        finished = now_ms()
        outcome.duration_s = time.perf_counter() - clock
        outcome.timings = {"decode_s": decoded_at - clock, "aggregate_s": aggregated_at - decoded_at,
                           "write_s": outcome.duration_s - (aggregated_at - clock)}
        mongo.write_aggregation_round(db, cfg, {
            "round_id": round_id, "version": version, "strategy": result.strategy,
            "n_participants": len(result.participants), "n_rejected": len(rejected_docs),
            "participants": result.participants, "rejected": rejected_docs, "n_samples": result.n_samples,
            "mean_loss": float(np.mean(losses)) if losses else None, "started_at": started, "finished_at": finished,
            "duration_s": outcome.duration_s, "timings": outcome.timings, "norms": norm_summary(result.norms),
            "update_norms": [{"device_id": d, "norm": n} for d, n in result.norms.items()],
            "dp_epsilon": model["dp_epsilon"], "cluster_sizes": model.get("cluster_sizes"),
            "published": outcome.published})
        outcome.message = (f"{round_id}: global model v{version} from {len(result.participants)} device(s) "
                           f"({result.strategy}), {len(rejected_docs)} rejected, {outcome.duration_s:.2f} s")
        return outcome
    finally:
        db.client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One FLEAD aggregation round on Spark.")
    parser.add_argument("--master", help="Spark master (default: spark-submit's --master, else "
                                         "aggregation.spark_master), e.g. local[2] or spark://host:7077")
    parser.add_argument("--no-publish", action="store_true",
                        help="store the model in MongoDB only, do not send it to the global-model topic")
    args = parser.parse_args(argv)
    from spark_jobs.session import run_job

    return run_job("flead-aggregate", lambda spark, cfg: run_round(spark, cfg, publish_model=not args.no_publish), args.master)

if __name__ == "__main__":
    sys.exit(main())
