"""One federated aggregation round: snapshots (the snapshots topic, or MongoDB) → check on Spark → strategy →
MongoDB + Kafka.

    spark-submit spark_jobs/aggregate_job.py                 # master: spark-submit's default, local[*]
    spark-submit --master spark://host:7077 spark_jobs/aggregate_job.py

Read top to bottom (`run_round`); the I/O steps are thin, the round itself is the pure `round_documents`:

1. Window (`read_input`). From the snapshots topic (`aggregation.snapshot_source` ``kafka``, the default): the
   offsets from where the previous round ended to the ends the round took when it started
   (`spark_jobs.topic_window`; MongoDB when the topic cannot give the whole window); the round's history keeps its
   end offsets (``snapshot_offsets``). From MongoDB (`read_window`, ``mongodb``): the snapshots created after the
   previous global model's ``created_at`` and at or before the round's start (its cut-off); the new model's
   ``created_at`` is that cut-off, so every snapshot falls into exactly one round, and a re-run with nothing new
   writes nothing.
2. Spark (`checked_updates`). The driver reads the window once (`aggregation.snapshot_read` ``driver``: one
   query, or the topic split by owner while Spark starts), or each partition reads it; each device's snapshots go
   to one partition (`spark_jobs.partitions`), which checks each on its own (`spark_jobs.snapshots`:
   signature, blob, shapes, counters), keeps one per device (the newest whose counters follow the device's
   previous snapshot: a forged or implausible snapshot cannot displace a device's honest one) and encodes the
   chosen updates with their architecture's codec (`models.updates.codec_for`). The vectors stay in the
   partition; the driver collects each device's choice, sample count and norm.
3. Driver (`round_documents`). The strategy built by `make_strategy` (with differential privacy or secure
   aggregation wrapped around it when configured) aggregates the chosen updates in the codec's vector space:
   FedAvg and the median as reductions over the partitions (`models.partitioned`: the driver receives sums and
   histograms, not the devices' vectors), the others on the collected vectors. The result becomes the signed
   global model (version n+1, ``previous_version`` n, ``issuer`` the aggregator), the per-cluster models of a
   clustered round (same version, ``_id`` ``"<version>:c<k>"``) and the round's history document. Under differential privacy these carry counts,
   the noised model and the privacy spent (ε per round and over the model's history), nothing per device.
4. Output (`write_round`, `publish`). `global_models`, then the global-model topic (`flead.global-model/1`, the
   clusters' models before the fleet model: a device that met the fleet model of a version first would adopt it and
   then skip its cluster's model of the same version), then `aggregation_history` (``_id`` = ``r<version>``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from itertools import islice  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from config import Config, ConfigError  # noqa: E402
from models.aggregation import AggregationError, AggregationResult, make_strategy  # noqa: E402
from models.integrity import AGGREGATOR_ISSUER, signing_key, sign_record  # noqa: E402
from models import partitioned  # noqa: E402
from models.partitioned import Cohort  # noqa: E402
from models.serialization import dumps, from_b64, loads, to_b64  # noqa: E402
from models.updates import Update, codec_for, federated_vectors, flatten  # noqa: E402
from spark_jobs.partitions import partition_count, round_blocks  # noqa: E402
from spark_jobs.session import context_of  # noqa: E402
from spark_jobs.snapshots import DeviceChoice, partitioned_summaries  # noqa: E402
from spark_jobs.topic_window import (OFFSETS_FIELD, TopicWindow, end_offsets, read_split_snapshots,  # noqa: E402
                                     send_acknowledged, topic_watermarks, window_ranges)
from storage.mongo import Store  # noqa: E402
from telemetry.schema import GLOBAL_MODEL  # noqa: E402

log = logging.getLogger("flead.aggregate")
SNAPSHOT_READS = ("driver", "executors")
SNAPSHOT_SOURCES = ("mongodb", "kafka")
PUBLISH_TIMEOUT_S = 30                 # a global model not acknowledged by then: stored, not published (logged)
DP_HISTORY_FIELDS = ("epsilon", "round_epsilon", "delta", "sampling_rate", "noise_multiplier", "clip_norm", "rounds")


@dataclass
class RoundOutcome:
    """What one call of `run_round` did: ``aggregated``, ``skipped`` (nothing or too little to aggregate) or
    ``exists`` (another run wrote this version first). Under differential privacy ``rejected`` is empty and
    ``n_rejected`` the only trace of refused updates."""

    status: str
    message: str
    version: int | None = None
    round_id: str | None = None
    n_participants: int = 0
    n_rejected: int = 0
    rejected: list[dict] = field(default_factory=list)
    published: bool = False
    duration_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RoundDocuments:
    """What a round writes: the signed fleet model, the signed cluster models, the history document."""

    model: dict
    clusters: list[dict]
    history: dict
    result: AggregationResult
    rejected: list[dict]


def now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- 1. window

def snapshot_read(cfg: Config) -> str:
    """`aggregation.snapshot_read`, checked: who reads the window's snapshots (``driver`` or ``executors``)."""
    if cfg.aggregation.snapshot_read not in SNAPSHOT_READS:
        raise ConfigError(f"aggregation.snapshot_read: {cfg.aggregation.snapshot_read!r} is not one of "
                         f"{', '.join(SNAPSHOT_READS)}")
    return cfg.aggregation.snapshot_read


def read_window(db, cfg: Config, started: int) -> tuple[dict | None, list[list]]:
    """The previous global model and the window's snapshots grouped per device, read in ONE query: whole
    documents (`aggregation.snapshot_read` ``driver``: the embedded FerretDB scans the whole collection for any
    filter but a single ``_id``, so one scan is the least a round can read), or only their ids (``executors``:
    each partition then fetches its own devices' snapshots by ``_id``, for a MongoDB with indexes and fleets
    whose window does not fit in the driver)."""
    previous = db.latest_global_model()
    window = {"$lte": started}
    if previous:
        window["$gt"] = previous["created_at"]
    whole = snapshot_read(cfg) == "driver"
    by_device: dict[str, list] = {}
    for doc in db.find("local_models", {"created_at": window}, None if whole else ("_id", "device_id")):
        by_device.setdefault(str(doc.get("device_id")), []).append(doc if whole else doc["_id"])
    return previous, [by_device[d] for d in sorted(by_device)]


@dataclass
class Window:
    """A round's input (`read_input`): its cut-off (``started``), the previous global model, the snapshots
    grouped per device (MongoDB) or per partition (the ``topic`` window read by the driver), or only the ``topic``
    window that the partitions read themselves, the ``offsets`` where the next round starts on the topic (None when
    the topic is not read), the read's own seconds, and how many of the window's messages the driver found to be no
    snapshot at all."""

    started: int
    previous: dict | None
    groups: list[list]
    read_s: float
    topic: TopicWindow | None = None
    offsets: dict | None = None
    unreadable: int = 0

    @property
    def empty(self) -> bool:
        return not self.groups if self.topic is None else self.topic.n_messages == 0

    @property
    def source(self):
        """What the partitions check: the groups, or the topic window when they read it themselves."""
        return self.topic if self.topic is not None and not self.groups else self.groups


def read_input(db, cfg: Config, started: int) -> Window:
    """The round's window (module docstring, step 1): on the snapshots topic under `aggregation.snapshot_source`
    ``kafka`` when the topic has all of it, else from MongoDB (`read_window`). With the ``kafka`` source the
    topic's ends are taken first, so the next round starts there even after a MongoDB read; a broker that cannot
    be reached makes the round read MongoDB (logged) and record no offsets. Under `aggregation.snapshot_read`
    ``driver`` the window is read here, once, and split among the partitions (`read_split_snapshots`, on the
    thread that overlaps Spark's start-up); under ``executors`` each partition reads it."""
    clock = time.perf_counter()
    source = cfg.aggregation.snapshot_source
    if source not in SNAPSHOT_SOURCES:
        raise ConfigError(f"aggregation.snapshot_source: {source!r} is not one of {', '.join(SNAPSHOT_SOURCES)}")
    offsets = None
    if source == "kafka":
        topic = cfg.kafka.topics.snapshots
        try:
            watermarks = topic_watermarks(cfg)
        except Exception as exc:  # the broker is down: MongoDB has the snapshots the sink stored
            log.warning("snapshots topic %s unreadable (%s): this round reads MongoDB", topic, exc)
        else:  # the cut-off after the ends: a snapshot this round reads has created_at ≤ it, so a later round
            started = max(started, now_ms())  # that reads MongoDB (created_at > this cut-off) cannot read it again
            offsets = end_offsets(topic, watermarks)
            previous = db.latest_global_model()
            previous_end = ((db.aggregation_round(previous["round_id"]) or {}).get(OFFSETS_FIELD)
                            if previous else None)
            window = window_ranges(topic, watermarks, previous_end, first_round=previous is None)
            if window is not None and snapshot_read(cfg) == "driver":
                parts, unreadable = read_split_snapshots(cfg, window, partition_count(cfg, window))
                return Window(started, previous, parts, time.perf_counter() - clock, window, offsets, unreadable)
            if window is not None:
                return Window(started, previous, [], time.perf_counter() - clock, window, offsets)
            log.info("the snapshots topic %s does not hold the whole window (no offsets from the previous round, "
                     "or records deleted): this round reads MongoDB", topic)
    previous, groups = read_window(db, cfg, started)
    return Window(started, previous, groups, time.perf_counter() - clock, None, offsets)


def read_round_window(cfg: Config) -> Window | None:
    """The window of a round that starts now (`read_input`), on a connection of its own; None under secure
    aggregation (whose steps read their own input). `main` runs it on a thread while Spark starts: the embedded
    FerretDB's scan (~4 s of the database server's CPU per 10,000 snapshots) and the SparkContext's start-up then
    overlap."""
    if cfg.privacy.secure_aggregation:
        return None
    with Store(cfg) as db:
        return read_input(db, cfg, now_ms())


# ---------------------------------------------------------------- 2. Spark

def checked_updates(blocks, cfg: Config, key: bytes, source, reference_shapes
                    ) -> tuple[list[DeviceChoice], Cohort | None, list | None, int]:
    """Every device's choice, checked and encoded on the executors (`spark_jobs.partitions`; ``source``: the
    devices' groups or the `TopicWindow` the partitions read), the round's `Cohort` whose vectors stay there, one
    chosen update's wire weights, and how many messages were no snapshot at all. When the chosen updates do not
    share one codec and layout, no cohort: the choices then carry their weights (the same checks, run again)."""
    heads = blocks.check(cfg, key, source, reference_shapes)
    unreadable = sum(h.unreadable for h in heads)
    summaries = partitioned_summaries(heads)
    if summaries is None:
        heads = blocks.check(cfg, key, source, reference_shapes, keep_weights=True)
        return [c for h in heads for c in h.choices], None, None, unreadable
    like = next((h.like for h in heads if h.like is not None), None)
    return ([c for h in heads for c in h.choices], Cohort(blocks, summaries, cfg.aggregation.median_bins), like,
            unreadable)


# ---------------------------------------------------------------- 3. the round (pure)

def global_weights(model: dict | None):
    return loads(from_b64(model["weights"]))[0] if model else None


def round_documents(cfg: Config, previous: dict | None, choices: list[DeviceChoice], started: int, key: bytes,
                    secure_round=None, cohort: Cohort | None = None, like=None) -> RoundDocuments:
    """The round from the devices' chosen updates: strategy, signed models, history. Raises `AggregationError`
    when the strategy cannot aggregate them (the caller skips the round).

    With ``cohort`` the chosen updates' codec vectors stay in Spark's partitions (`models.partitioned`; the
    choices then carry counters, not weights, and ``like`` is one chosen update's wire weights)."""
    current = global_weights(previous)
    early = [r for c in choices for r in c.rejected]
    chosen = [c for c in choices if c.update is not None]
    if not chosen:
        raise AggregationError("no usable update" + (f"; rejected: {_reasons(early)}" if early else ""))
    architecture = Counter(c.architecture for c in chosen).most_common(1)[0][0]
    codec = codec_for(architecture)
    if secure_round is not None:  # masked words of vectors the devices encoded themselves
        like = current if current is not None else [np.zeros(shape) for shape in secure_round.shapes]
        updates = [c.update for c in chosen]
    elif cohort is not None:  # vectors in the partitions
        like = current if current is not None else like
    else:  # plain updates: into the codec's vector space here
        like = current if current is not None else chosen[0].update.weights
        vectors = federated_vectors(codec, [c.update.weights for c in chosen])
        updates = [Update(c.device_id, [vector], c.update.n_samples, c.update.version, c.update.n_seen,
                          c.update.created_at) for c, vector in zip(chosen, vectors)]
    length = codec.federated_vector(like).shape
    strategy = make_strategy(cfg, [length] if current is not None or secure_round else None,
                             dp_history=(previous or {}).get("dp"), secure_round=secure_round)
    current_vector = [codec.federated_vector(current)] if current is not None else None
    try:
        result = (partitioned.aggregate(strategy, cohort, current_vector) if cohort is not None
                  else strategy.aggregate(updates, current_vector))
    except AggregationError as exc:
        raise AggregationError(str(exc) + (f"; refused before: {_reasons(early)}"
                                           if early and not cfg.privacy.enabled else "")) from None

    base_version = previous["version"] if previous else 0
    version, round_id = base_version + 1, f"r{base_version + 1}"
    rejected = [{"device_id": d, "reason": r} for d, r in early + result.rejected]
    private = result.private
    listed = max(0, cfg.aggregation.listed_devices)  # lists of devices in documents and messages: the counts are whole
    blob_meta = {"architecture": architecture, "model_version": version}
    model = GLOBAL_MODEL.make(
        version=version, previous_version=base_version, issuer=AGGREGATOR_ISSUER, round_id=round_id,
        strategy=result.strategy, participants=[] if private else result.participants[:listed],
        rejected=[] if private else rejected[:listed], n_participants=len(result.participants),
        n_rejected=len(rejected),
        n_samples=result.n_samples, created_at=started, window_start=previous["created_at"] if previous else None,
        cluster=None, dp_epsilon=result.extra["dp"]["epsilon"] if "dp" in result.extra else None,
        weights=to_b64(dumps(codec.weights_from_vector(flatten(result.weights), like), blob_meta)))
    if "dp" in result.extra:
        model["dp"] = result.extra["dp"]
    clusters = []
    if "cluster_weights" in result.extra:
        members: dict[int, list[str]] = {}
        for device, k in result.extra["clusters"].items():
            members.setdefault(k, []).append(device)
        model["cluster_sizes"] = [len(members.get(k, [])) for k in range(len(result.extra["cluster_weights"]))]
        n_samples = {c.device_id: c.update.n_samples for c in chosen}
        for k, weights in enumerate(result.extra["cluster_weights"]):  # its `members` adopt it
            cluster = {**model, "cluster": k, "participants": members.get(k, [])[:listed],
                       "n_samples": int(sum(n_samples[d] for d in members.get(k, []))),
                       "weights": to_b64(dumps(codec.weights_from_vector(flatten(weights), like),
                                               {**blob_meta, "cluster": k}))}
            parts = member_parts(members.get(k, []), members_budget(cfg))
            clusters += [sign_record({**cluster, "members": part, "part": j, "parts": len(parts)}, key)
                         for j, part in enumerate(parts)]
    history = {"round_id": round_id, "version": version, "strategy": result.strategy,
               "n_participants": len(result.participants), "n_rejected": len(rejected), "started_at": started,
               "cluster_sizes": model.get("cluster_sizes")}
    if private:  # counts and the privacy spent only: nothing per device, nothing unnoised about the updates
        history |= {f"dp_{k}": result.extra["dp"][k] for k in DP_HISTORY_FIELDS}
    else:
        participants = set(result.participants)
        losses = [c.loss for c in chosen if c.device_id in participants and c.loss is not None]
        history |= {"participants": result.participants[:listed], "rejected": rejected[:listed],
                    "n_samples": result.n_samples,
                    "mean_loss": float(np.mean(losses)) if losses else None, "norms": norm_summary(result.norms),
                    "update_norms": [{"device_id": d, "norm": n} for d, n in islice(result.norms.items(), listed)],
                    "dp_epsilon": None}
    return RoundDocuments(sign_record(model, key), clusters, history, result, [] if private else rejected)


def members_budget(cfg: Config) -> int:
    """`aggregation.cluster_members_bytes`, checked: above 0 (else a record per member) and below
    `kafka.max_message_bytes` (else a record too large to send)."""
    budget = cfg.aggregation.cluster_members_bytes
    if not 0 < budget < cfg.kafka.max_message_bytes:
        raise ConfigError(f"aggregation.cluster_members_bytes: {budget} must be above 0 and below "
                          f"kafka.max_message_bytes ({cfg.kafka.max_message_bytes}): a cluster model's record carries "
                          f"its weights beside that many bytes of member ids")
    return budget


def member_parts(members: list[str], budget_bytes: int) -> list[list[str]]:
    """``members`` in order, cut into lists whose JSON takes at most ``budget_bytes`` each (one list at least, and
    at least one id in each): a cluster model's records."""
    parts: list[list[str]] = [[]]
    size = 2
    for device in members:
        cost = len(json.dumps(device)) + 2  # the id, its comma and space
        if parts[-1] and size + cost > budget_bytes:
            parts.append([])
            size = 2
        parts[-1].append(device)
        size += cost
    return parts


def _reasons(rejected: list[tuple[str, str]], shown: int = 5) -> str:
    """The first ``shown`` refusals, and how many more (a message, not a report: the round documents list all)."""
    text = "; ".join(f"{d}: {r}" for d, r in rejected[:shown])
    return text + (f"; and {len(rejected) - shown} more" if len(rejected) > shown else "")


def norm_summary(norms: dict[str, float]) -> dict[str, float] | None:
    """min / median / mean / max of the update norms (None without any)."""
    if not norms:
        return None
    values = np.array(list(norms.values()))
    return {"min": float(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
            "max": float(values.max())}


# ---------------------------------------------------------------- 4. output

def publish(cfg: Config, messages: list[dict]) -> None:
    """Send `flead.global-model/1` (and `flead.cohort/1`) messages to the global-model topic, keyed by version
    (round id); raises if any is not acknowledged."""
    send_acknowledged(cfg, cfg.kafka.topics.global_model,
                      [(str(m.get("version", m.get("round_id"))).encode(), json.dumps(m).encode()) for m in messages],
                      PUBLISH_TIMEOUT_S)


def run_round(spark, cfg: Config, publish_model: bool = True, window: Future | None = None) -> RoundOutcome:
    """One aggregation round (see the module docstring) on ``spark`` (a SparkSession or a SparkContext); never
    writes a version twice. ``window``: the round's input being read meanwhile (`read_round_window` on a thread,
    `spark_jobs.session.run_job`)."""
    clock = time.perf_counter()
    key = signing_key(cfg)
    db = Store(cfg)
    send = partial(publish, cfg) if publish_model else (lambda messages: None)
    sc = context_of(spark)
    blocks = round_blocks(sc)
    secure, cohort, like, ahead, unreadable = None, None, None, None, 0
    try:
        if window is not None:
            ahead = window.result()
        started = ahead.started if ahead is not None else now_ms()
        window = ahead
        if cfg.privacy.secure_aggregation:  # a round over several runs: spark_jobs/secure_round.py
            from spark_jobs.secure_round import secure_round_step

            previous = db.latest_global_model()
            secure = secure_round_step(sc, db, cfg, key, previous, started, send)
            if secure.status != "ready":
                return RoundOutcome("skipped", secure.message, duration_s=time.perf_counter() - clock)
            choices = secure.choices
            read_at = time.perf_counter()
        else:
            window = ahead if ahead is not None else read_input(db, cfg, started)
            previous, started = window.previous, window.started
            read_at = time.perf_counter()
            if window.empty:
                since = f"since global model v{previous['version']}" if previous else "stored yet"
                return RoundOutcome("skipped", f"no new snapshots {since}; nothing to do",
                                    duration_s=time.perf_counter() - clock)
            current = global_weights(previous)
            choices, cohort, like, unreadable = checked_updates(
                blocks, cfg, key, window.source, [w.shape for w in current] if current else None)
            unreadable += window.unreadable
            if unreadable:
                log.warning("%d message(s) of the snapshots topic were no snapshot (the sink keeps them as dead "
                            "letters)", unreadable)
        checked_at = time.perf_counter()
        try:
            documents = round_documents(cfg, previous, choices, started, key,
                                        secure.secure_round if secure else None, cohort, like)
        except AggregationError as exc:
            early = [{"device_id": d, "reason": r} for c in choices for d, r in c.rejected]
            private = cfg.privacy.enabled
            return RoundOutcome("skipped", f"round skipped: {exc}", n_rejected=len(early),
                                rejected=[] if private else early, duration_s=time.perf_counter() - clock)
        aggregated_at = time.perf_counter()
        model, version = documents.model, documents.model["version"]
        outcome = RoundOutcome("aggregated", "", version=version, round_id=model["round_id"],
                               n_participants=model["n_participants"], n_rejected=model["n_rejected"],
                               rejected=documents.rejected)
        if not db.write_global_model(model):
            return RoundOutcome("exists", f"global model v{version} was written by another run meanwhile; "
                                          "nothing written", version=version, round_id=model["round_id"],
                                duration_s=time.perf_counter() - clock)
        db.write_cluster_models(documents.clusters)
        if secure:
            from spark_jobs.secure_round import finish

            finish(db, cfg, secure.protocol, version)
        if publish_model:
            try:
                publish(cfg, [*documents.clusters, model])  # clusters first: see the module docstring
                outcome.published = True
            except Exception as exc:  # the model is stored; consumers can still fetch it from MongoDB or the API
                log.error("global model v%d stored but not published: %s", version, exc)
        outcome.duration_s = time.perf_counter() - clock
        outcome.timings = {"read_s": read_at - clock, "decode_s": checked_at - read_at,
                           "aggregate_s": aggregated_at - checked_at,
                           "write_s": outcome.duration_s - (aggregated_at - clock)}
        if ahead is not None:  # read_s is then the wait for it, after Spark's start-up
            outcome.timings["read_ahead_s"] = ahead.read_s
        db.write_aggregation_round({**documents.history, "finished_at": now_ms(),
                                    "duration_s": outcome.duration_s, "timings": outcome.timings,
                                    "published": outcome.published, "n_unreadable": unreadable,
                                    **({OFFSETS_FIELD: window.offsets} if window and window.offsets else {})})
        outcome.message = (f"{model['round_id']}: global model v{version} from {model['n_participants']} device(s) "
                           f"({model['strategy']}), {model['n_rejected']} rejected, {outcome.duration_s:.2f} s"
                           + (f", ε = {model['dp_epsilon']:.3g} (δ = {model['dp']['delta']:g})"
                              if model.get("dp") else "")
                           + (f"; clusters of {', '.join(map(str, model['cluster_sizes']))} device(s)"
                              if model.get("cluster_sizes") else ""))
        return outcome
    finally:
        blocks.close()
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One FLEAD aggregation round on Spark.")
    parser.add_argument("--master", help="Spark master (default: spark-submit's --master, else "
                                         "aggregation.spark_master), e.g. local[2] or spark://host:7077")
    parser.add_argument("--no-publish", action="store_true",
                        help="store the model in MongoDB only, do not send it to the global-model topic")
    args = parser.parse_args(argv)
    from spark_jobs.session import run_job

    return run_job("flead-aggregate",
                   lambda spark, cfg, window: run_round(spark, cfg, not args.no_publish, window),
                   args.master, context_only=True, ahead=read_round_window)


if __name__ == "__main__":
    sys.exit(main())
