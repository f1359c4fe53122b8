"""The aggregator's side of a secure-aggregation round (`models.secure_aggregation`), one step per run.

A round takes several runs of the aggregate job, its state kept in `aggregation_history` under the protocol id
``r<version>.<attempt>`` (``status``: collecting → recovering → aggregated | abandoned):

1. announce: no open round → the cohort (devices whose newest enrolment snapshot shares the most common layout)
   goes out signed as `flead.cohort/1` on the global-model topic; the devices answer with masked snapshots.
2. collect: every member answered → the round is aggregated (`SecureRound` for `make_strategy`).
3. recover: `privacy.secure_round_timeout_s` after the announcement with members missing → the cohort goes out
   again with ``dropped``; survivors answer with their pair seeds with the dropped; once all have, the round is
   aggregated without the dropped. Another timeout without them → abandoned, and the next run announces anew.

The aggregator reads masked words (checked and decoded on Spark's executors) and revealed seeds only; it never
holds a private key or a survivor pair's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from config import Config

from models.integrity import AGGREGATOR_ISSUER, sign_record, verify_record, wire_form
from models.secure_aggregation import (ENROLMENT, MASKED, SEED_REVEAL, SecureRound, choose_cohort,
                                       cohort_from_record, decode_words, json_shapes, revealed_from_records)
from models.updates import Update
from spark_jobs.snapshots import DeviceChoice, counters_problem
from storage.mongo import Store
from telemetry.schema import SNAPSHOT_SCHEMA

OPEN = ("collecting", "recovering")


@dataclass
class SecureStep:
    """What this run does for the open secure round: ``status`` ``ready`` (aggregate ``choices`` now, under
    ``secure_round``) or ``waiting`` (``message`` says for what); ``protocol`` is the round's state document."""

    status: str
    message: str
    protocol: dict | None = None
    choices: list[DeviceChoice] | None = None
    secure_round: SecureRound | None = None


def _verified(docs, key: bytes) -> list[dict]:
    return [d for d in docs if verify_record(wire_form(d, SNAPSHOT_SCHEMA), key) is None and not counters_problem(d)]


def open_protocol(db, cfg, base_version: int) -> dict | None:
    """The newest protocol document of the round building on ``base_version`` (None before its first attempt)."""
    docs = db.collection("aggregation_history").find(
        {"protocol_for": base_version + 1}).sort([("attempt", -1)]).limit(1)
    return next(iter(docs), None)


def announce(db, cfg, key: bytes, base_version: int, attempt: int, now: int, publish) -> SecureStep:
    enrolments = _verified(db.find("local_models", {"encoding": ENROLMENT}), key)
    round_id = f"r{base_version + 1}.{attempt}"
    try:
        record = choose_cohort(enrolments, round_id, base_version, cfg.privacy.secure_max_weight, now,
                               AGGREGATOR_ISSUER, cfg.privacy.secure_cohort_size)
    except Exception as exc:  # AggregationError: nobody enrolled yet
        return SecureStep("waiting", str(exc))
    if len(record["members"]) < cfg.aggregation.min_devices:
        return SecureStep("waiting", f"secure aggregation: {len(record['members'])} device(s) enrolled with one "
                                     f"layout, a round needs {cfg.aggregation.min_devices}")
    signed = sign_record(record, key)
    protocol = {"round_id": round_id, "strategy": "secure-fedavg", "started_at": now, "status": "collecting",
                "protocol_for": base_version + 1, "attempt": attempt, "cohort": signed,
                "n_participants": 0, "n_rejected": 0}
    db.write_aggregation_round(protocol)
    publish([signed])
    return SecureStep("waiting", f"{round_id}: cohort of {len(record['members'])} device(s) announced; waiting for "
                                 "their masked updates", protocol)


def masked_partition(cfg_values: dict, key: bytes, round_id: str, members: list[str], length: int, ids):
    """Executor side: fetch masked snapshots, keep the signed ones of members whose words decode."""
    ids = list(ids)
    if not ids:
        return
    cfg = Config(cfg_values)
    db = Store(cfg)
    try:
        docs = _verified(db.local_models_by_id(ids), key)
    finally:
        db.close()
    for doc in docs:
        if doc.get("secure_round") == round_id and doc["device_id"] in members:
            try:
                yield {**doc, "words": decode_words(doc["weights"], length)}
            except ValueError:
                continue  # not a masked vector of this round's length: the device counts as not answered


def masked_answers(sc, cfg, db, key: bytes, cohort) -> list[dict]:
    """Each member's newest verified masked answer for the round (decoded on Spark's executors)."""
    ids = [d["_id"] for d in db.find("local_models", {"encoding": MASKED, "secure_round": cohort.round_id}, ("_id",))]
    if not ids:
        return []
    rows = (sc.parallelize(ids, max(1, min(len(ids), cfg.aggregation.spark_partitions)))
            .mapPartitions(partial(masked_partition, cfg.to_dict(), key, cohort.round_id, cohort.ids, cohort.length))
            .collect())
    newest: dict[str, dict] = {}
    for row in rows:
        if row["version"] > newest.get(row["device_id"], {}).get("version", -1):
            newest[row["device_id"]] = row
    return list(newest.values())


def secure_round_step(sc, db, cfg, key: bytes, previous: dict | None, now: int, publish) -> SecureStep:
    """One run's step of the secure round that builds on ``previous`` (see the module docstring)."""
    base = previous["version"] if previous else 0
    protocol = open_protocol(db, cfg, base)
    if protocol is None or protocol["status"] not in OPEN:
        return announce(db, cfg, key, base, (protocol or {}).get("attempt", 0) + 1, now, publish)
    record = protocol["cohort"]
    if verify_record(record, key):
        raise RuntimeError(f"{protocol['round_id']}: the stored cohort announcement does not verify")
    cohort = cohort_from_record(record)
    newest = {doc["device_id"]: doc for doc in masked_answers(sc, cfg, db, key, cohort)}
    missing = sorted(set(cohort.members) - set(newest))
    timeout_ms = cfg.privacy.secure_round_timeout_s * 1000
    revealed = {}
    if missing:
        if now - protocol["started_at"] < timeout_ms and protocol["status"] == "collecting":
            return SecureStep("waiting", f"{cohort.round_id}: {len(newest)} of {len(cohort.members)} masked updates",
                              protocol)
        if protocol["status"] == "collecting":
            recovery = sign_record({**{k: v for k, v in record.items() if k != "signature"}, "dropped": missing,
                                    "created_at": now}, key)
            db.write_aggregation_round({**protocol, "status": "recovering", "recovering_since": now,
                                                    "n_dropped": len(missing), "cohort": recovery})
            publish([recovery])
            return SecureStep("waiting", f"{cohort.round_id}: {len(missing)} member(s) dropped out; asked the "
                                         "survivors for their pair seeds", protocol)
        reveals = _verified(db.find("local_models", {"encoding": SEED_REVEAL, "secure_round": cohort.round_id}),
                            key)
        revealed = revealed_from_records(reveals, cohort)
        complete = all(set(missing) <= set(revealed.get(d, {})) for d in newest)
        if not complete:
            if now - protocol["recovering_since"] >= timeout_ms:
                db.write_aggregation_round({**protocol, "status": "abandoned"})
                return SecureStep("waiting", f"{cohort.round_id}: abandoned (survivors did not reveal their seeds "
                                             "in time); the next run announces a new cohort", protocol)
            return SecureStep("waiting", f"{cohort.round_id}: waiting for survivors' pair seeds", protocol)
    choices = [DeviceChoice(d, Update(d, [doc["words"]], int(doc["n_samples"]),
                                      int(doc["version"]), int(doc["n_seen"]), int(doc["created_at"])),
                            architecture=record.get("architecture"))  # names the codec of the masked vectors
               for d, doc in sorted(newest.items())]
    return SecureStep("ready", "", protocol, choices,
                      SecureRound(cohort, revealed, [tuple(s) for s in json_shapes(record["shapes"])]))


def finish(db, cfg, protocol: dict, version: int) -> None:
    """Mark the protocol document of an aggregated secure round."""
    db.write_aggregation_round({**protocol, "status": "aggregated", "version": version})
