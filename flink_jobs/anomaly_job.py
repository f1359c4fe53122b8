"""The FLEAD stream job: telemetry in, per-device scores, alerts and weight snapshots out, global models in.

    .venv/bin/python flink_jobs/anomaly_job.py [--bounded] [--from-savepoint PATH|latest]
    flink run -py flink_jobs/anomaly_job.py [-pyfs models,telemetry,config,flink_jobs] [-- --bounded]

Data flow (topic names from `cfg.kafka.topics`, shapes in docs/contracts.md):

    telemetry ── key by device (JVM) ──┬─ DeviceScorer ──────────┬─ scores (one batch record per micro-batch)
                                       │  decode + validate,     │─ alerts (one record per anomaly)
    global-model ── broadcast ─────────┘  keyed state: detector  │─ model-snapshots
                                                                 └─ dead-letters (with the reason)

The JVM reads each telemetry record's Kafka key (the device id) and partitions by it, so the messages cross into
Python once, in the scorer, which decodes and validates them (`telemetry.schema.decode_columns`). Each device's
`DeviceDetector` lives in keyed state. Readings are micro-batched per device (`stream.micro_batch_size` or
`stream.micro_batch_timeout_ms`), scored, then learned; a micro-batch's score records leave as one
`flead.scores/1` Kafka record. Global models arrive as broadcast state; a device adopts the newest (of its
cluster, if the model is clustered) at its next batch. Outputs are Kafka topics only: the storage sink service
writes them to MongoDB idempotently. Sinks are at-least-once: after a restart from a checkpoint, readings after it
are scored again under the same ids.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # `flink run -py` starts this file with only its own folder on the path

import numpy as np  # noqa: E402
from pyflink.common import Configuration, Duration, Types, WatermarkStrategy  # noqa: E402
from pyflink.common.serialization import SimpleStringSchema  # noqa: E402
from pyflink.datastream import (KeyedStream, OutputTag, RuntimeContext,  # noqa: E402
                                StreamExecutionEnvironment)
from pyflink.datastream.connectors.base import DeliveryGuarantee  # noqa: E402
from pyflink.datastream.connectors.kafka import (KafkaOffsetResetStrategy, KafkaOffsetsInitializer,  # noqa: E402
                                                 KafkaRecordSerializationSchema, KafkaSink, KafkaSource)
from pyflink.datastream.functions import KeyedBroadcastProcessFunction  # noqa: E402
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor  # noqa: E402
from pyflink.java_gateway import get_gateway  # noqa: E402
from pyflink.table import StreamTableEnvironment  # noqa: E402

from config import load_config  # noqa: E402
from flink_jobs.device_state import DeviceModelState  # noqa: E402
from models.detector import DetectorSettings, DeviceDetector  # noqa: E402
from models.features import NonFiniteMetricError  # noqa: E402
from models.serialization import SerializationError, from_b64, loads, to_b64  # noqa: E402
from telemetry.schema import (Columns, InvalidMessage, dead_letter, decode_columns, dumps_json,  # noqa: E402
                              encode_scores)

LOG = logging.getLogger("flead.stream")
CONNECTOR_JAR = "flink-sql-connector-kafka-5.0.0-2.2.jar"
PROJECT_PACKAGES = ("config", "models", "telemetry", "flink_jobs")  # shipped to the Python workers
SNAPSHOT_SCHEMA = "flead.snapshot/1"
GLOBAL_MODEL_SCHEMA = "flead.global-model/1"
# Partial micro-batches of a bounded run are flushed by an event-time timer this far after the batch's first
# message: the end-of-input watermark fires it (processing-time timers do not fire once the input has ended), a
# live stream flushes by processing time long before. It also becomes the Kafka timestamp of what the flush emits,
# so it must stay well inside the broker's accepted range (message.timestamp.after.max.ms, 1 h by default).
END_OF_INPUT_FLUSH_DELAY_MS = 30 * 60 * 1000
UNCLUSTERED = ""  # broadcast-state key of a global model without a cluster

DEAD_LETTERS = OutputTag("dead-letters", Types.STRING())
ALERTS = OutputTag("alerts", Types.STRING())
SNAPSHOTS = OutputTag("snapshots", Types.STRING())
GLOBAL_MODELS = MapStateDescriptor("global-models", Types.STRING(), Types.PICKLED_BYTE_ARRAY())


def now_ms() -> int:
    return int(time.time() * 1000)


def to_json(record: dict) -> str:
    """Compact JSON, non-finite floats as null."""
    return dumps_json(record).decode()


# -- score ------------------------------------------------------------------------------------------------------

class DeviceScorer(KeyedBroadcastProcessFunction):
    """Per device: buffer readings into micro-batches, adopt the newest global model, score then learn, emit
    score records (anomalies also as alerts) and, every so often, a weight snapshot."""

    def __init__(self, settings: DetectorSettings, stream: dict, topics: dict):
        self.settings = settings
        self.batch_size = stream["micro_batch_size"]
        self.batch_timeout_ms = stream["micro_batch_timeout_ms"]
        self.snapshot_every = stream["snapshot_every"]
        self.snapshot_interval_ms = stream["snapshot_interval_s"] * 1000
        self.global_policy = stream["global_policy"]
        self.blend_weight = stream["blend_weight"]
        self.telemetry_topic = topics["telemetry"]
        self.global_model_topic = topics["global_model"]

    def open(self, runtime_context: RuntimeContext):
        self.model = runtime_context.get_state(ValueStateDescriptor("detector", Types.PICKLED_BYTE_ARRAY()))
        self.buffer = runtime_context.get_state(ValueStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY()))
        metrics = runtime_context.get_metrics_group()
        self.records_scored = metrics.counter("records_scored")
        self.anomalies = metrics.counter("anomalies")
        self.dead_letters = metrics.counter("dead_letters")
        self.values_imputed = metrics.counter("values_imputed")
        self.metric_values_ignored = metrics.counter("metric_values_ignored")
        self.snapshots = metrics.counter("snapshots")
        self.global_models_adopted = metrics.counter("global_models_adopted")
        self.global_models_rejected = metrics.counter("global_models_rejected")
        self.reports_refusals = runtime_context.get_index_of_this_subtask() == 0  # every subtask sees each model
        self.refused_global = set()  # (device_id, version) whose shapes did not fit: logged once, not retried
        self.reported_unknown = set()  # (device_id, metric names) dead-lettered once: `report_unknown_metrics`
        self.globals = None  # cluster -> (version, weights, assignments): see `global_models`

    # global models: broadcast side

    def process_broadcast_element(self, value: str, ctx: KeyedBroadcastProcessFunction.Context):
        try:
            message = json.loads(value)
            if message.get("schema") != GLOBAL_MODEL_SCHEMA:
                raise ValueError(f"schema {message.get('schema')!r}, expected {GLOBAL_MODEL_SCHEMA!r}")
            version = message["version"]
            if type(version) is not int or version < 1:
                raise ValueError(f"version: expected an integer >= 1, got {version!r}")
            weights, _ = loads(from_b64(message["weights"]))
            if not all(np.isfinite(w).all() for w in weights):
                raise ValueError("non-finite weights")
        except (ValueError, KeyError, TypeError, AttributeError, SerializationError) as exc:
            self.global_models_rejected.inc()
            if self.reports_refusals:
                LOG.warning("refused a global model from %s: %s", self.global_model_topic, exc)
                yield DEAD_LETTERS, dead_letter(value, f"global model refused: {exc}", self.global_model_topic).decode()
            return
        cluster = UNCLUSTERED if message.get("cluster") is None else str(message["cluster"])
        held = self.global_models(ctx).get(cluster)
        if held is None or held[0] < version:
            model = (version, weights, message.get("assignments") or {})
            ctx.get_broadcast_state(GLOBAL_MODELS).put(cluster, model)  # checkpointed copy
            self.globals[cluster] = model

    def global_models(self, ctx) -> dict:
        """The broadcast state as a local dict: read from Flink once (after a restore it holds the restored models),
        then kept in step by `process_broadcast_element` (every subtask sees every global model). Reading the
        broadcast state itself costs a round trip to the JVM per call: once per micro-batch was most of the job's
        Python time."""
        if self.globals is None:
            self.globals = dict(ctx.get_broadcast_state(GLOBAL_MODELS).items())
        return self.globals

    def newest_global(self, ctx, device_id: str):
        """(version, weights) of the device's cluster model if there is one, else of the unclustered model."""
        newest = None
        for cluster, (version, weights, assignments) in self.global_models(ctx).items():
            if cluster == UNCLUSTERED or str(assignments.get(device_id)) == cluster:
                if cluster != UNCLUSTERED or newest is None:
                    newest = (version, weights)
        return newest

    def adopt_newest_global(self, ctx, device_id: str, detector: DeviceDetector) -> None:
        newest = self.newest_global(ctx, device_id)
        if newest is None or newest[0] <= detector.global_version or (device_id, newest[0]) in self.refused_global:
            return
        try:
            detector.adopt_global(newest[1], newest[0], self.global_policy, self.blend_weight)
            self.global_models_adopted.inc()
        except ValueError as exc:  # shapes of another architecture
            self.refused_global.add((device_id, newest[0]))
            self.global_models_rejected.inc()
            LOG.warning("device %s refused global model %d: %s", device_id, newest[0], exc)

    # telemetry: keyed side

    def process_element(self, message: bytes | None, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        try:
            value = self.parse(message, ctx.get_current_key())
        except InvalidMessage as exc:
            self.dead_letters.inc()
            yield DEAD_LETTERS, dead_letter(message, exc.reason, self.telemetry_topic, exc.device_id).decode()
            return
        buffered = self.buffer.value()
        if buffered is None and len(value.seqs) >= self.batch_size:  # the message is a micro-batch already
            yield from self.score(ctx, [value])
            return
        if buffered is None:
            buffered = [value]
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time() + self.batch_timeout_ms)
            timers.register_event_time_timer(ctx.timestamp() + END_OF_INPUT_FLUSH_DELAY_MS)
        else:
            buffered.append(value)
        if sum(len(batch.seqs) for batch in buffered) >= self.batch_size:
            self.buffer.clear()
            yield from self.score(ctx, buffered)
        else:
            self.buffer.update(buffered)

    @staticmethod
    def parse(message: bytes | None, key: str) -> Columns:
        """The message as columns; `InvalidMessage` if it breaks the contract or is not the keyed device's."""
        columns = decode_columns(message)
        if columns.device_id != key:
            raise InvalidMessage(f"device_id {columns.device_id!r} under the Kafka key {key!r}", columns.device_id)
        return columns

    def on_timer(self, timestamp: int, ctx: KeyedBroadcastProcessFunction.OnTimerContext):
        buffered = self.buffer.value()
        if buffered is not None:
            self.buffer.clear()
            yield from self.score(ctx, buffered)

    def score(self, ctx, batches: list):
        device_id = ctx.get_current_key()
        state = self.model.value()
        if state is None:
            state = DeviceModelState(DeviceDetector(list(batches[0].names), self.settings), now_ms())
        detector = state.detector
        self.adopt_newest_global(ctx, device_id, detector)
        X = np.concatenate([self.model_columns(detector, batch) for batch in batches])
        for batch in batches:
            yield from self.report_unknown_metrics(device_id, detector, batch)
        seqs = [s for batch in batches for s in batch.seqs]
        stamps = [t for batch in batches for t in batch.ts]
        labels = [label for batch in batches for label in batch.labels]
        try:
            results = [(slice(None), detector.process_many(X))]
        except NonFiniteMetricError:  # model.nan_policy = reject: score the good readings, dead-letter the others
            results = []
            for i in range(X.shape[0]):
                try:
                    results.append((slice(i, i + 1), detector.process_many(X[i:i + 1])))
                except NonFiniteMetricError as exc:
                    self.dead_letters.inc()
                    raw = {"device_id": device_id, "seq": seqs[i], "ts": stamps[i],
                           "metrics": dict(zip(detector.metric_names, X[i].tolist())), "label": labels[i]}
                    yield DEAD_LETTERS, dead_letter(to_json(raw), str(exc), self.telemetry_topic, device_id).decode()
        scored_at = now_ms()
        for rows, result in results:
            yield from self.score_records(device_id, detector, seqs[rows], stamps[rows], labels[rows], result,
                                          scored_at)
        if state.snapshot_due(scored_at, self.snapshot_every, self.snapshot_interval_ms):
            snap = state.take_snapshot(scored_at)
            self.snapshots.inc()
            yield SNAPSHOTS, to_json({
                "schema": SNAPSHOT_SCHEMA, "device_id": device_id, "version": snap["version"],
                "global_version": snap["global_version"], "n_samples": snap["n_samples"],
                "n_seen": detector.n_seen, "loss": None if snap["loss"] is None else float(snap["loss"]),
                "weights": to_b64(snap["weights"]), "created_at": scored_at})
        self.model.update(state)

    @staticmethod
    def model_columns(detector: DeviceDetector, batch: Columns) -> np.ndarray:
        """The batch's values in the detector's metric order (a metric the message lacks is missing: nan, imputed
        and counted by the detector; one the model does not know is left out: `report_unknown_metrics`)."""
        if list(batch.names) == detector.metric_names:
            return batch.X
        position = {name: i for i, name in enumerate(batch.names)}
        out = np.full((batch.X.shape[0], len(detector.metric_names)), math.nan)
        for j, name in enumerate(detector.metric_names):
            if name in position:
                out[:, j] = batch.X[:, position[name]]
        return out

    def report_unknown_metrics(self, device_id: str, detector: DeviceDetector, batch: Columns):
        """Metrics the device's model was not created with cannot be scored: their values are counted
        (`metric_values_ignored`), and the first message of a device bringing a new such set is dead-lettered
        with the reason (one per set and worker, so a device that keeps sending them does not flood the topic)."""
        if list(batch.names) == detector.metric_names:
            return
        unknown = tuple(sorted(set(batch.names) - set(detector.metric_names)))
        if not unknown:
            return
        self.metric_values_ignored.inc(len(unknown) * len(batch.seqs))
        if (device_id, unknown) not in self.reported_unknown:
            self.reported_unknown.add((device_id, unknown))
            reason = (f"metrics {', '.join(unknown)} are not in the device's model (created with "
                      f"{len(detector.metric_names)} metrics): their values are ignored, the others scored")
            first = {"device_id": device_id, "seq": batch.seqs[0], "ts": batch.ts[0],
                     "metrics": dict(zip(batch.names, batch.X[0].tolist()))}
            yield DEAD_LETTERS, dead_letter(to_json(first), reason, self.telemetry_topic, device_id).decode()

    def score_records(self, device_id, detector, seqs, stamps, labels, result, scored_at):
        """One `flead.scores/1` batch of the micro-batch's score records (one Kafka record: Beam's per-element
        cost, the JVM's and the broker's are per record, not per reading); each anomaly also as an alert."""
        self.records_scored.inc(len(seqs))
        self.values_imputed.inc(result.n_imputed)
        model_version, global_version = detector.model_version, detector.global_version
        scores = [{"seq": seq, "ts": ts, "score": score, "threshold": threshold, "is_anomaly": anomaly,
                   "top_metrics": [{"metric": m, "share": share} for m, share in top], "label": label}
                  for seq, ts, score, threshold, anomaly, top, label in zip(
                      seqs, stamps, result.scores.tolist(), result.thresholds.tolist(), result.is_anomaly.tolist(),
                      result.top_metrics, labels)]
        yield encode_scores(device_id, model_version, global_version, scored_at, scores).decode()
        for record in scores:
            if record["is_anomaly"]:
                self.anomalies.inc()
                yield ALERTS, to_json({"device_id": device_id, **record, "model_version": model_version,
                                       "global_version": global_version, "scored_at": scored_at})


# -- wiring -----------------------------------------------------------------------------------------------------

def latest_checkpoint(cfg) -> Path | None:
    """The newest retained checkpoint (a ``chk-N`` folder with ``_metadata``) of any run, or None."""
    found = sorted(checkpoint_dir(cfg).glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def checkpoint_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "checkpoints"


def flink_configuration(cfg, bounded: bool, recover_from: str | None) -> Configuration:
    stream = cfg.stream
    conf = Configuration()
    if bounded:  # a failure should surface, not replay the input from the start into the output topics
        conf.set_string("restart-strategy.type", "none")
    conf.set_string("parallelism.default", str(stream.parallelism))
    conf.set_string("python.fn-execution.bundle.size", str(stream.bundle_size))
    conf.set_string("python.fn-execution.bundle.time", str(stream.bundle_time_ms))
    conf.set_string("python.state.cache-size", str(stream.state_cache_size))
    conf.set_string("execution.buffer-timeout.interval", f"{stream.buffer_timeout_ms} ms")
    conf.set_string("pipeline.object-reuse", str(stream.object_reuse).lower())
    python = stream.python_executable or sys.executable
    conf.set_string("python.executable", python)
    conf.set_string("python.client.executable", python)
    jar = cfg.build_dir / "flink-libs" / CONNECTOR_JAR
    if jar.exists():  # else it comes from `flink run --jarfile` or the cluster's lib/
        conf.set_string("pipeline.jars", jar.as_uri())
    conf.set_string("execution.checkpointing.interval", f"{stream.checkpoint_interval_ms} ms")
    conf.set_string("execution.checkpointing.dir", checkpoint_dir(cfg).as_uri())
    conf.set_string("execution.checkpointing.externalized-checkpoint-retention", "RETAIN_ON_CANCELLATION")
    conf.set_string("state.backend.type", stream.state_backend)
    if recover_from:
        conf.set_string("execution.state-recovery.path", recover_from)
    return conf


def kafka_source(cfg, topic: str, group_id: str, bounded: bool) -> KafkaSource:
    builder = (KafkaSource.builder()
               .set_bootstrap_servers(cfg.kafka_bootstrap)
               .set_topics(topic)
               .set_group_id(group_id)
               .set_starting_offsets(KafkaOffsetsInitializer.committed_offsets(KafkaOffsetResetStrategy.EARLIEST))
               .set_value_only_deserializer(SimpleStringSchema())
               .set_property("fetch.max.wait.ms", str(cfg.stream.source_fetch_max_wait_ms)))
    if bounded:
        builder = builder.set_bounded(KafkaOffsetsInitializer.latest())
    return builder.build()


def kafka_sink(cfg, topic: str) -> KafkaSink:
    return (KafkaSink.builder()
            .set_bootstrap_servers(cfg.kafka_bootstrap)
            .set_record_serializer(KafkaRecordSerializationSchema.builder()
                                   .set_topic(topic)
                                   .set_value_serialization_schema(SimpleStringSchema())
                                   .build())
            .set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
            .set_property("linger.ms", str(cfg.stream.sink_linger_ms))
            .set_property("compression.type", cfg.stream.sink_compression)
            .build())


def sql_string(value) -> str:
    """A Flink SQL string literal."""
    return "'" + str(value).replace("'", "''") + "'"


def keyed_telemetry(env: StreamExecutionEnvironment, cfg, bounded: bool) -> KeyedStream:
    """The telemetry topic keyed by device, read and partitioned on the JVM side.

    `DataStream.key_by` runs its key selector in a Python operator of its own: every message would cross the
    JVM/Python boundary twice more and wait one more bundle, and the selector would have to decode it. Instead the
    Kafka table connector reads the record key (producers key each message by its ``device_id``, which also keeps a
    device's messages in order in one partition) and the value as raw bytes; a record without a key is keyed by
    the ``device_id`` Flink SQL's `JSON_VALUE` finds in it ("" if none). A message whose ``device_id`` differs
    from its key, or that has none, is dead-lettered by the scorer. The JVM then partitions
    ``Row(device_id, message, rowtime)`` by its first field with the key selector `key_by` itself uses (so the
    scorer sees the message as its value and the key as `ctx.get_current_key()`); `to_append_stream` because the
    Python operator needs a `RowTypeInfo` (`to_data_stream` gives an `ExternalTypeInfo`). What it saves is
    measured in flink_jobs/README.md, "Throughput".

    Event time is the Kafka record timestamp (when the message entered Kafka): watermarks come from the source
    without a JSON decode, and every output record carries a current Kafka timestamp (the ``ts`` of a replayed
    data set may be years old, which time-based topic retention would delete at once).
    """
    stream = cfg.stream
    options = {
        "connector": "kafka", "topic": cfg.kafka.topics.telemetry,
        "properties.bootstrap.servers": cfg.kafka_bootstrap, "properties.group.id": stream.consumer_group,
        "scan.startup.mode": "group-offsets", "properties.auto.offset.reset": "earliest",
        "properties.fetch.max.wait.ms": stream.source_fetch_max_wait_ms, "scan.watermark.idle-timeout": "5 s",
        "key.format": "raw", "key.fields": "device_key", "value.format": "raw", "value.fields-include": "EXCEPT_KEY"}
    if bounded:
        options["scan.bounded.mode"] = "latest-offset"
    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE telemetry (
            device_key STRING,
            message BYTES,
            rowtime TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
            WATERMARK FOR rowtime AS rowtime - INTERVAL '{stream.out_of_orderness_ms / 1000:.3f}' SECOND
        ) WITH ({", ".join(f"{sql_string(k)} = {sql_string(v)}" for k, v in options.items())})""")
    rows = t_env.to_append_stream(t_env.sql_query("""
        SELECT CASE WHEN device_key IS NULL OR device_key = ''
                    THEN COALESCE(JSON_VALUE(CAST(message AS STRING), '$.device_id'), '')
                    ELSE device_key END AS device_id,
               message, rowtime
        FROM telemetry"""), Types.ROW([Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.INSTANT()]))
    key_by_first_field = get_gateway().jvm.org.apache.flink.streaming.api.functions.python.KeyByKeySelector()
    return KeyedStream(rows._j_data_stream.keyBy(key_by_first_field, Types.ROW([Types.STRING()]).get_java_type_info()),
                       Types.PRIMITIVE_ARRAY(Types.BYTE()), rows)


def build_job(env: StreamExecutionEnvironment, cfg, bounded: bool) -> None:
    """Sources → key by device (JVM) (+ broadcast global models) → DeviceScorer (parse, score) → sinks."""
    topics = cfg.kafka.topics.to_dict()
    stream = cfg.stream
    for package in PROJECT_PACKAGES:
        env.add_python_file(str(PROJECT_ROOT / package))

    global_models = env.from_source(
        kafka_source(cfg, topics["global_model"], f"{stream.consumer_group}-global", bounded),
        WatermarkStrategy.for_monotonous_timestamps().with_idleness(Duration.of_seconds(1)),
        "global-models").uid("global-model-source").broadcast(GLOBAL_MODELS)

    scores = (keyed_telemetry(env, cfg, bounded)
              .connect(global_models)
              .process(DeviceScorer(DetectorSettings.from_config(cfg), stream.to_dict(), topics),
                       output_type=Types.STRING())
              .name("score").uid("device-scorer"))

    scores.sink_to(kafka_sink(cfg, topics["scores"])).name("scores").uid("scores-sink")
    scores.get_side_output(ALERTS).sink_to(kafka_sink(cfg, topics["alerts"])).name("alerts").uid("alerts-sink")
    scores.get_side_output(SNAPSHOTS).sink_to(kafka_sink(cfg, topics["snapshots"])).name("snapshots").uid(
        "snapshots-sink")
    (scores.get_side_output(DEAD_LETTERS)
     .sink_to(kafka_sink(cfg, topics["dead_letters"])).name("dead-letters").uid("dead-letters-sink"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bounded", action="store_true",
                        help="read the telemetry topic up to its current end, then stop (tests, benchmarks)")
    parser.add_argument("--from-savepoint", metavar="PATH|latest",
                        help="restore from a savepoint or retained checkpoint ('latest': the newest checkpoint "
                             "in <state_dir>/flink/checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config()
    recover_from = args.from_savepoint
    if recover_from == "latest":
        found = latest_checkpoint(cfg)
        if found is None:
            print(f"--from-savepoint latest: no retained checkpoint in {checkpoint_dir(cfg)}", file=sys.stderr)
            return 2
        recover_from = str(found)
    # Python workers as separate processes, like on a cluster (else the driver runs every UDF: one core only).
    os.environ.setdefault("_python_worker_execution_mode", "process")
    log_dir = cfg.state_dir / "logs" / "flink"  # the local MiniCluster's log (default: inside site-packages)
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir))
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg, args.bounded, recover_from))
    build_job(env, cfg, args.bounded)
    LOG.info("starting (bounded=%s, recover from %s, parallelism %d)", args.bounded, recover_from,
             cfg.stream.parallelism)
    env.execute("flead-anomaly-detection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
