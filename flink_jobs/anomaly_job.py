"""The FLEAD stream job: telemetry in, per-device scores, alerts and weight snapshots out, global models in.

    .venv/bin/python flink_jobs/anomaly_job.py [--bounded] [--from-savepoint PATH|latest|auto]
    flink run -py flink_jobs/anomaly_job.py [-pyfs config,models,telemetry,scoring,flink_jobs] [-- --bounded]

Data flow (topic names from `cfg.kafka.topics`, shapes in docs/contracts.md):

    telemetry ─── key by device (JVM) ──┬─ DeviceScorer ─────────┬─ scores (one batch record per micro-batch)
                                        │  (scoring.stream)      ├─ alerts (one record per anomaly)
    global-model + feedback ─ broadcast ┘  keyed state:          ├─ model-snapshots (signed)
                                           KeyedDevice           ├─ incidents, drift-events
                                                                 └─ dead-letters (with the reason)

The JVM reads each telemetry record's Kafka key (the device id) and partitions by it, so the messages cross into
Python once, in the scorer. `DeviceScorer` is wiring: it holds the keyed state (one `scoring.state.KeyedDevice` per
device: its `DeviceState` and partial micro-batch), the flush timers and the broadcast state (verified global models,
secure-aggregation cohorts, operators' feedback), and hands every callback to `scoring.stream.StreamScoring`, which
decides (validate, micro-batch, adopt, score then learn, emit) and is unit-tested without Flink. Outputs are Kafka
topics only: the storage sink service writes them to MongoDB idempotently. Sinks are at-least-once: after a restart
from a checkpoint, readings after it are scored again under the same ids.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # `flink run -py` starts this file with only its own folder on the path

from apache_beam.runners.worker import statesampler  # noqa: E402  (PyFlink's Python worker runs on Beam)
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
from flink_jobs import WORKER_PACKAGES, jvm_args, worker_blas_env  # noqa: E402
from flink_jobs.binding import LOOPBACK_SETTINGS, use_loopback_lib_for_local_run  # noqa: E402
from flink_jobs.checkpoints import (checkpoint_dir, checkpoint_settings, latest_restore_point, new_job_id,  # noqa: E402
                                    note_backend, restore_problem, retire_savepoints, savepoint_dir)
from flink_jobs.python_worker import freeze_startup_objects, without_sampling_thread  # noqa: E402
from models.detector import DetectorSettings  # noqa: E402
from models.integrity import key_from, key_source  # noqa: E402
from scoring.broadcasts import Broadcasts  # noqa: E402
from scoring.state import KeyedDevice  # noqa: E402
from scoring.stream import COUNTERS, Emitted, StreamOptions, StreamScoring  # noqa: E402
from telemetry.schema import InvalidMessage  # noqa: E402

LOG = logging.getLogger("flead.stream")
CONNECTOR_JAR = "flink-sql-connector-kafka-5.0.0-2.2.jar"
JOB_NAME = "flead-anomaly-detection"
# Partial micro-batches of a bounded run are flushed by an event-time timer this far after the batch's first
# message: the end-of-input watermark fires it (processing-time timers do not fire once the input has ended), a
# live stream flushes by processing time long before. It also becomes the Kafka timestamp of what the flush emits,
# so it must stay well inside the broker's accepted range (message.timestamp.after.max.ms, 1 h by default).
END_OF_INPUT_FLUSH_DELAY_MS = 30 * 60 * 1000

DEAD_LETTERS = OutputTag("dead-letters", Types.STRING())
ALERTS = OutputTag("alerts", Types.STRING())
SNAPSHOTS = OutputTag("snapshots", Types.STRING())
INCIDENTS = OutputTag("incidents", Types.STRING())
DRIFT = OutputTag("drift", Types.STRING())
BROADCASTS = MapStateDescriptor("broadcasts", Types.STRING(), Types.PICKLED_BYTE_ARRAY())


def now_ms() -> int:
    return int(time.time() * 1000)


def pending_timers(now: int, event_time: int, batch_timeout_ms: int, bounded: bool) -> tuple[int, int | None]:
    """The flush timers of a new partial micro-batch: (processing time, event time or None).

    A live job flushes by processing time only. A bounded run also needs the event-time timer (processing-time
    timers do not fire once the input has ended; the end-of-input watermark fires it). In a live job that timer
    would only ever fire half an hour later into an empty buffer, and every one set stays in the timer queue (and
    its checkpoints) until then: one per partial micro-batch, hundreds per second at 5,000 readings/s."""
    return now + batch_timeout_ms, (event_time + END_OF_INPUT_FLUSH_DELAY_MS) if bounded else None


# -- score ------------------------------------------------------------------------------------------------------

class ScorerCounters:
    """The scorer's Flink counters (`scoring.stream.COUNTERS`), incremented in the operator's own metrics scope.

    PyFlink 2.2 calls `on_timer` outside that scope: `StatefulFunctionOperation.process_timer`
    (pyflink/fn_execution/beam/beam_operations_*) is not wrapped in the operation's ``scoped_process_state`` as
    `process` is, so Beam credits a counter incremented in a timer to another step's metrics container and Flink
    never sees it (a live job scored a device's last partial micro-batch when its processing-time timer fired, but
    ``records_scored`` never counted it). So element callbacks remember the scope they run in, and a timer's counts
    are made inside it; a timer that fires before any element reached the worker (after a restore) keeps its
    counts until one does."""

    def __init__(self, metrics_group, names=COUNTERS):
        self.counters = {name: metrics_group.counter(name) for name in names}
        self.scope = None  # the operation's Beam execution state (holds its metrics container)
        self.pending: Counter = Counter()

    def in_element(self) -> None:
        """Called first by every element callback: remember its scope, make the counts timers kept."""
        tracker = statesampler.get_current_tracker()
        self.scope = None if tracker is None else tracker.current_state()
        if self.pending:
            self._inc(self.pending)
            self.pending.clear()

    def add(self, counts: Mapping[str, int], in_timer: bool = False) -> None:
        if not in_timer:
            self._inc(counts)
        elif self.scope is None:
            self.pending.update(counts)
        else:
            with self.scope:
                self._inc(counts)

    def _inc(self, counts: Mapping[str, int]) -> None:
        for name, n in counts.items():
            self.counters[name].inc(n)


class DeviceScorer(KeyedBroadcastProcessFunction):
    """Flink's side of `scoring.stream.StreamScoring`: keyed state (the device's `KeyedDevice`: its `DeviceState` and
    partial micro-batch, written once per callback), flush timers, the broadcast state (global models, cohorts,
    feedback), counters, the signing key, and the outputs. Every decision is the scoring module's."""

    def __init__(self, scoring: StreamScoring, batch_timeout_ms: int, key_source: tuple, max_feedback: int,
                 bounded: bool = False, bundle_state_sampling: bool = True, freeze_startup: bool = False):
        self.scoring = scoring
        self.batch_timeout_ms = batch_timeout_ms
        self.key_source = key_source  # (integrity.key, key file): each worker loads the key in `open`
        self.max_feedback = max_feedback
        self.bounded = bounded  # partial micro-batches also flushed by an event-time timer (see pending_timers)
        self.bundle_state_sampling = bundle_state_sampling  # stream.bundle_state_sampling (flink_jobs.python_worker)
        self.freeze_startup = freeze_startup  # stream.freeze_worker_startup_objects (flink_jobs.python_worker)

    def open(self, runtime_context: RuntimeContext):
        self.device = runtime_context.get_state(ValueStateDescriptor("detector", Types.PICKLED_BYTE_ARRAY()))
        # the partial micro-batch's keyed state of checkpoints from before `KeyedDevice`: read, then cleared
        self.older_buffer = runtime_context.get_state(ValueStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY()))
        self.counters = ScorerCounters(runtime_context.get_metrics_group())
        self.reports_refusals = runtime_context.get_index_of_this_subtask() == 0  # every subtask sees each record
        self.scoring.use_key(key_from(*self.key_source))
        self.held = None  # Broadcasts: see `broadcasts`
        if not self.bundle_state_sampling:
            without_sampling_thread(statesampler.StateSampler, statesampler.set_current_tracker)
        if self.freeze_startup:
            freeze_startup_objects()

    def keyed(self) -> KeyedDevice:
        """The current device's keyed state (`KeyedDevice`), whichever layout it was restored in."""
        value = self.device.value()
        if isinstance(value, KeyedDevice):
            return value
        older = self.older_buffer.value()  # a new device, or one restored from a checkpoint of the earlier layout
        if older is not None:
            self.older_buffer.clear()
        return KeyedDevice.of(value, older)

    def broadcasts(self, ctx) -> Broadcasts:
        """The broadcast state as a local object: read from Flink once (after a restore it holds the restored
        entries), then kept in step by `process_broadcast_element` (every subtask sees every broadcast record).
        Reading the broadcast state itself costs a round trip to the JVM per call."""
        if self.held is None:
            self.held = Broadcasts(ctx.get_broadcast_state(BROADCASTS).items(), self.max_feedback)
        return self.held

    def process_broadcast_element(self, value: str, ctx: KeyedBroadcastProcessFunction.Context):
        self.counters.in_element()
        entry, emitted = self.scoring.receive_broadcast(value, self.broadcasts(ctx), self.reports_refusals)
        if entry is not None:
            ctx.get_broadcast_state(BROADCASTS).put(*entry)  # checkpointed copy
        yield from self.emit(emitted)

    def process_element(self, message: bytes | None, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        self.counters.in_element()
        try:
            columns = self.scoring.parse(message, ctx.get_current_key())
        except InvalidMessage as exc:
            yield from self.emit(self.scoring.refused(message, exc))
            return
        held = self.keyed()
        timers = ctx.timer_service()
        now, entered_kafka = timers.current_processing_time(), ctx.timestamp()
        step = self.scoring.buffer(held.buffered, columns, lag_ms=now - entered_kafka, state=held.state)
        pending = None if step.buffered is None else held.timers
        if step.started:
            pending = pending_timers(now, entered_kafka, self.batch_timeout_ms, self.bounded)
            flush_at, end_of_input_at = pending
            timers.register_processing_time_timer(flush_at)
            if end_of_input_at is not None:
                timers.register_event_time_timer(end_of_input_at)
        elif step.buffered is None and held.buffered is not None:
            self.delete_timers(timers, held.timers)  # scored by size: they would only call back for nothing
        yield from self.store(ctx, held.state, step.ready, KeyedDevice(None, step.buffered, pending))

    @staticmethod
    def delete_timers(timers, held_timers: tuple[int | None, int | None] | None) -> None:
        flush_at, end_of_input_at = held_timers or (None, None)
        if flush_at is not None:
            timers.delete_processing_time_timer(flush_at)
        if end_of_input_at is not None:
            timers.delete_event_time_timer(end_of_input_at)

    def on_timer(self, timestamp: int, ctx: KeyedBroadcastProcessFunction.OnTimerContext):
        held = self.keyed()
        if held.buffered:
            self.delete_timers(ctx.timer_service(), held.timers)  # the other one (bounded runs)
            yield from self.store(ctx, held.state, held.buffered, KeyedDevice(), in_timer=True)

    def store(self, ctx, state, ready: list | None, kept: KeyedDevice, in_timer: bool = False):
        """Score the `ready` batches (if any) with the device's `state`, then write the device's keyed state once:
        the state scored and what `kept` holds of the partial micro-batch."""
        emitted = Emitted()
        if ready:
            state, emitted = self.scoring.score(state, ctx.get_current_key(), ready, self.broadcasts(ctx), now_ms())
        self.device.update(kept._replace(state=state))
        yield from self.emit(emitted, in_timer)

    def emit(self, emitted: Emitted, in_timer: bool = False):
        self.counters.add(emitted.counts, in_timer)  # before the first record leaves (see ScorerCounters)
        yield from emitted.scores
        for record in emitted.alerts:
            yield ALERTS, record
        for record in emitted.snapshots:
            yield SNAPSHOTS, record
        for record in emitted.dead_letters:
            yield DEAD_LETTERS, record
        for record in emitted.incidents:
            yield INCIDENTS, record
        for record in emitted.drift:
            yield DRIFT, record


# -- wiring -----------------------------------------------------------------------------------------------------

def flink_configuration(cfg, bounded: bool, recover_from: str | None, job_id: str) -> Configuration:
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
    jars = [jar.as_uri()] if jar.exists() else []  # else it comes from `flink run --jarfile` or the cluster's lib/
    # the job's own metrics: Flink's Prometheus reporter on 127.0.0.1 (monitoring/flink_metrics.py)
    from monitoring.flink_metrics import prometheus_reporter
    reporter, reporter_jars = prometheus_reporter(cfg)
    for key, value in reporter.items():
        conf.set_string(key, value)
    if jars + reporter_jars:
        conf.set_string("pipeline.jars", ";".join(jars + reporter_jars))
    # checkpoints (flink_jobs/checkpoints.py); every server on 127.0.0.1 (flink_jobs/binding.py)
    settings = {**checkpoint_settings(cfg, job_id), **LOOPBACK_SETTINGS}
    for key, value in settings.items():
        conf.set_string(key, value)
    if recover_from:
        conf.set_string("execution.state-recovery.path", recover_from)
    return conf


def kafka_source(cfg, topics: list[str], group_id: str, bounded: bool) -> KafkaSource:
    builder = (KafkaSource.builder()
               .set_bootstrap_servers(cfg.kafka_bootstrap)
               .set_topics(*topics)
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
            .set_property("max.request.size", str(cfg.kafka.max_message_bytes))
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
    """Sources → key by device (JVM) (+ broadcast global models and feedback) → DeviceScorer (parse, score) → sinks."""
    topics = cfg.kafka.topics.to_dict()
    stream = cfg.stream
    for package in WORKER_PACKAGES:
        env.add_python_file(str(PROJECT_ROOT / package))

    broadcasts = env.from_source(
        kafka_source(cfg, [topics["global_model"], topics["feedback"]], f"{stream.consumer_group}-global", bounded),
        WatermarkStrategy.for_monotonous_timestamps().with_idleness(Duration.of_seconds(1)),
        "global-models-and-feedback").uid("global-model-source").broadcast(BROADCASTS)

    scoring = StreamScoring(DetectorSettings.from_config(cfg), StreamOptions.from_config(cfg))
    scores = (keyed_telemetry(env, cfg, bounded)
              .connect(broadcasts)
              .process(DeviceScorer(scoring, stream.micro_batch_timeout_ms, key_source(cfg),
                                    cfg.feedback.max_patterns, bounded, stream.bundle_state_sampling,
                                    stream.freeze_worker_startup_objects),
                       output_type=Types.STRING())
              .name("score").uid("device-scorer"))

    scores.sink_to(kafka_sink(cfg, topics["scores"])).name("scores").uid("scores-sink")
    for tag, topic in ((ALERTS, "alerts"), (SNAPSHOTS, "snapshots"), (DEAD_LETTERS, "dead_letters"),
                       (INCIDENTS, "incidents"), (DRIFT, "drift")):
        name = tag.tag_id
        scores.get_side_output(tag).sink_to(kafka_sink(cfg, topics[topic])).name(name).uid(f"{name}-sink")


class StopRequest:
    """Remembers a SIGTERM (`flead stream stop`, `flead down`, a plain ``kill``) instead of dying of it, so the live job
    can stop with a savepoint (`run_until_stopped`). Installed first thing, so a stop during start-up is kept too."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, *_) -> None:
        self.requested = True


def java_reason(exc: Exception) -> str:
    """The innermost cause's message of a Java exception raised through py4j (else the exception's text)."""
    cause = getattr(exc, "java_exception", None)
    if cause is None:
        return str(exc)
    while cause.getCause() is not None:
        cause = cause.getCause()
    return f"{cause.getClass().getSimpleName()}: {cause.getMessage()}"


def run_until_stopped(env: StreamExecutionEnvironment, cfg, job_name: str, stop: StopRequest) -> int:
    """Run the live job until it ends, or until `stop` is requested: then stop it with a savepoint in `savepoint_dir`
    (Flink's canonical format: any state backend restores it), so the next start resumes every device's model from
    that moment, not from the last checkpoint. A savepoint needs every task running: while the job is still starting
    (or restarting) it is tried again, for up to ``stream.stop_savepoint_timeout_s``."""
    if stop.requested:  # before the job was submitted: nothing learned since the point it would restore
        LOG.info("SIGTERM before the job started: not started")
        return 0
    client = env.execute_async(job_name)
    result = client.get_job_execution_result()
    while not stop.requested and not result.done():
        time.sleep(0.5)
    if not stop.requested:
        result.result()  # raises if the job failed
        return 0
    LOG.info("SIGTERM: stopping job %s with a savepoint in %s", client.get_job_id(), savepoint_dir(cfg))
    jvm = get_gateway().jvm
    canonical = jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    deadline = time.monotonic() + cfg.stream.stop_savepoint_timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:  # PyFlink's JobClient.stop_with_savepoint has no format argument (Flink's default is canonical)
            path = client._j_job_client.stopWithSavepoint(False, savepoint_dir(cfg).as_uri(), canonical).get(
                max(1, int(remaining)), jvm.java.util.concurrent.TimeUnit.SECONDS)
            break
        except Exception as exc:  # py4j's error carries Flink's reason (e.g. a task not running yet)
            reason = java_reason(exc)
            if result.done() or time.monotonic() + 1 >= deadline:
                LOG.error("no savepoint (the job resumes from its newest checkpoint instead): %s", reason)
                return 1
            LOG.info("no savepoint yet, trying again in 1 s: %s", reason)
            time.sleep(1)
    result.result()
    retired = retire_savepoints(cfg, cfg.stream.savepoints_retained)
    LOG.info("stopped with savepoint %s (%d older one(s) deleted)", path, len(retired))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bounded", action="store_true",
                        help="read the telemetry topic up to its current end, then stop (tests, benchmarks)")
    parser.add_argument("--from-savepoint", metavar="PATH|latest|auto",
                        help="restore from a savepoint or retained checkpoint ('latest': the newest of "
                             "<state_dir>/flink/checkpoints and /savepoints; 'auto': that one if there is one, else "
                             "start fresh)")
    args = parser.parse_args(argv)
    submitted_by_flink_cli = "PYFLINK_GATEWAY_PORT" in os.environ  # else PyFlink starts a JVM with a MiniCluster
    stop = None if args.bounded or submitted_by_flink_cli else StopRequest()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config()
    recover_from = args.from_savepoint
    if recover_from in ("latest", "auto"):
        found = latest_restore_point(cfg)
        if found is None and recover_from == "latest":
            print(f"--from-savepoint latest: no retained checkpoint in {checkpoint_dir(cfg)} and no savepoint in "
                  f"{savepoint_dir(cfg)}", file=sys.stderr)
            return 2
        recover_from = str(found) if found else None
    problem = restore_problem(cfg, Path(recover_from)) if recover_from else None
    if problem:
        print(problem, file=sys.stderr)
        return 2
    job_id = new_job_id()
    note_backend(cfg, job_id)
    # Python workers as separate processes, like on a cluster (else the driver runs every UDF: one core only).
    os.environ.setdefault("_python_worker_execution_mode", "process")
    for name, value in worker_blas_env(cfg).items():
        os.environ.setdefault(name, value)
    os.environ["JVM_ARGS"] = jvm_args(cfg, os.environ.get("JVM_ARGS", ""))  # pyflink starts the MiniCluster with them
    log_dir = cfg.state_dir / "logs" / "flink"  # the local MiniCluster's log (default: inside site-packages)
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir))
    use_loopback_lib_for_local_run(cfg)
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(cfg, args.bounded, recover_from,
                                                                                 job_id))
    build_job(env, cfg, args.bounded)
    LOG.info("starting job %s (bounded=%s, recover from %s, parallelism %d)", job_id, args.bounded, recover_from,
             cfg.stream.parallelism)
    if stop is None:  # bounded, or `flink run` owns the job (`flink stop --savepointPath` stops it)
        env.execute(JOB_NAME)
        return 0
    return run_until_stopped(env, cfg, JOB_NAME, stop)


if __name__ == "__main__":
    sys.exit(main())
