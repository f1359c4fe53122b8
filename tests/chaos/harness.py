"""The chaos suite's framework: a supervised pipeline on its own state dir and ports, paced replay, kills, and
the ledger that counts what was lost, duplicated, dead-lettered and rejected.

Everything that depends on how readings are stored goes through `stored_readings` (and the roll-up check through
`rollup_mismatches`): when `predictions` and `device_data` become bucketed documents, only those change.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np

from config import PROJECT_ROOT, Config, load_config
from flink_jobs.checkpoints import completed_checkpoints
from models.integrity import signing_key
from services import processes
from services.service import read_spec
from telemetry import producer as telemetry_producer
from telemetry.producer import ProduceResult, order_by_time, produce, producer_config, replay
from telemetry.readers import open_reader
from telemetry.schema import Reading

RATE = 2000.0               # readings/s of every phase
MESSAGE_BATCH = 16          # readings per Kafka message, as `flead produce` sends them
RESTART_WITHIN_S = 120.0    # the supervisor must have the killed part running again by then
DRAIN_WITHIN_S = 300.0      # ... and every reading stored by then
# Settings of the pipeline under test (FLEAD_* overrides): frequent checkpoints and snapshots, so a restart
# replays little and model versions move during a phase; a quick first back-off.
PIPELINE_SETTINGS = {
    "FLEAD_STREAM_TIMESTAMP_WINDOW_S": "0",  # a replay of recorded data (2024): no window around now
    "FLEAD_STREAM_CHECKPOINT_INTERVAL_MS": "2000",
    "FLEAD_STREAM_SNAPSHOT_EVERY": "200",
    "FLEAD_SUPERVISION_BACKOFF_INITIAL_S": "1.0",
    "FLEAD_SUPERVISION_BACKOFF_MAX_S": "8.0",
}


@dataclass
class PhaseResult:
    """One row of the chaos table."""

    fault: str
    sent: int
    stored: int
    lost: int
    duplicated: int
    dead_lettered: int
    rejected: int
    restarts: int
    recovery_s: float | None
    rollups_off: int
    seconds: float
    timeline: dict = field(default_factory=dict)


RESULTS: list[PhaseResult] = []


def table(rows: list[PhaseResult]) -> str:
    """The results as a Markdown table (printed at the end of the run, kept in docs/reliability.md)."""
    head = ("| fault (kill -9 mid-stream at 2,000 readings/s) | readings sent | stored | lost | duplicated | "
            "dead-lettered | rejected | restarts | back after | roll-up buckets off | phase |")
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for r in rows:
        back = f"{r.recovery_s:.1f} s" if r.recovery_s is not None else "—"
        lines.append(f"| {r.fault} | {r.sent:,} | {r.stored:,} | {r.lost} | {r.duplicated} | {r.dead_lettered} | "
                     f"{r.rejected} | {r.restarts} | {back} | {r.rollups_off} | {r.seconds:.0f} s |")
    return "\n".join(lines)


def timelines(rows: list[PhaseResult]) -> str:
    """When, in each phase, the part was killed, ran again, the last reading was sent and all were stored."""
    return "\n".join(f"{r.fault}: " + ", ".join(f"{event} {t:.1f} s" for event, t in r.timeline.items())
                     for r in rows)


# --- what is stored (the only code that knows the documents' shape) --------------------------------------------

def stored_readings(db, cfg: Config, key: str) -> dict[tuple[str, int], list[dict]]:
    """Every reading stored in collection `key` (``predictions`` or ``device_data``), by (device_id, seq): one
    entry per stored copy, each with the fields the checks need (ts, score, threshold, is_anomaly,
    model_version where the collection has them). A document holds one device's readings of one sink flush as
    packed columns (storage/buckets.py)."""
    from storage.buckets import READING_COLUMNS, SCORE_COLUMNS, unpack_columns

    spec = SCORE_COLUMNS if key == "predictions" else READING_COLUMNS
    fields = ("seq", "ts", "score", "threshold", "is_anomaly", "model_version")
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for doc in db[cfg.mongo.collections[key]].find({}):
        cols = unpack_columns(doc, spec)
        for i, seq in enumerate(cols["seq"].tolist()):
            row = {name: cols[name][i].item() for name in fields if name in cols}
            out[(doc["device_id"], seq)].append({"device_id": doc["device_id"], **row})
    return out


def rollup_buckets(records, width_ms: int) -> dict[str, dict]:
    """Score records summed per device and roll-up bucket (``<device>:<bucket start>``): n, anomalies, score_sum."""
    from storage.rollups import bucket_starts

    out: dict[str, dict] = {}
    for r in records:
        start = int(bucket_starts(np.array([r["ts"]]), width_ms)[0])
        b = out.setdefault(f"{r['device_id']}:{start}", {"n": 0, "anomalies": 0, "score_sum": 0.0})
        b["n"] += 1
        b["anomalies"] += int(bool(r["is_anomaly"]))
        b["score_sum"] += r["score"]
    return out


def rollup_mismatches(db, cfg: Config, predictions: dict[tuple[str, int], list[dict]]) -> dict[str, str]:
    """Roll-up buckets whose counts or sums differ from the stored predictions: bucket id → what differs. The
    device roll-ups are partial sums (one per sink generation, storage/rollups.py): they are added up first."""
    expected = rollup_buckets((copies[0] for copies in predictions.values()), cfg.rollups.device_bucket_s * 1000)
    stored: dict[str, dict] = {}
    for partial in db[cfg.mongo.collections.score_rollups].find({}):
        b = stored.setdefault(f"{partial['device_id']}:{partial['ts']}", {"n": 0, "anomalies": 0, "score_sum": 0.0})
        for name in b:
            b[name] += partial[name]
    off = {}
    for bucket_id in sorted(set(expected) | set(stored)):
        want, got = expected.get(bucket_id), stored.get(bucket_id)
        if want is None or got is None or want["n"] != got["n"] or want["anomalies"] != got["anomalies"] \
                or abs(want["score_sum"] - got["score_sum"]) > 1e-6 * max(1.0, abs(want["score_sum"])):
            off[bucket_id] = f"stored {_counts(got)}, from predictions {_counts(want)}"
    return off


def _counts(bucket: dict | None) -> str:
    return "nothing" if bucket is None else f"n={bucket['n']} anomalies={bucket['anomalies']}"


def version_resets(predictions: dict[tuple[str, int], list[dict]], fault_seq: dict[str, int]) -> list[str]:
    """Devices whose model version went back after the fault: any reading sent after it (seq > fault_seq) scored
    by a model more than one version older than the newest that scored a reading sent before it. (One version of
    slack: the job resumes from its last checkpoint, up to a checkpoint interval before the kill, and replays.)"""
    before: dict[str, int] = defaultdict(int)
    after: dict[str, int] = {}
    for (device, seq), copies in predictions.items():
        if device not in fault_seq:
            continue
        version = copies[0]["model_version"]
        if seq <= fault_seq[device]:
            before[device] = max(before[device], version)
        else:
            after[device] = min(after.get(device, version), version)
    return [f"{device}: version {before[device]} before the fault, {lowest} after"
            for device, lowest in sorted(after.items()) if lowest < before[device] - 1]


def model_versions_before(predictions: dict[tuple[str, int], list[dict]], fault_seq: dict[str, int]) -> int:
    """The smallest, over devices, of the newest model version that scored a reading sent before the fault (a
    check for resets means something only once devices have moved past version 0)."""
    newest: dict[str, int] = defaultdict(int)
    for (device, seq), copies in predictions.items():
        if seq <= fault_seq.get(device, -1):
            newest[device] = max(newest[device], copies[0]["model_version"])
    return min(newest.values(), default=0)


# --- the pipeline ------------------------------------------------------------------------------------------------

@dataclass
class Pipeline:
    """`flead up`, the sink and the stream job, supervised, on a private state dir and free ports."""

    state: Path
    env: dict
    cfg: Config = field(init=False)

    def __post_init__(self):
        self.cfg = load_config(env=self.env)

    @classmethod
    def create(cls, state: Path) -> "Pipeline":
        env = {**os.environ, "FLEAD_STATE_DIR": str(state), **PIPELINE_SETTINGS}
        for key in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "MONGO_PORT"):
            env[f"FLEAD_{key}"] = str(processes.free_port())
        for key in list(env):  # the session's servers and test topics are not ours
            if key in ("FLEAD_KAFKA_BOOTSTRAP", "FLEAD_MONGO_URI", "FLEAD_MONGO_DATABASE") \
                    or key.startswith("FLEAD_KAFKA_TOPICS_"):
                env.pop(key)
        return cls(state, env)

    def flead(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=self.env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"flead {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def pid(self, name: str) -> int | None:
        return processes.running_pid(self.state, name)

    def restarts(self, name: str) -> int:
        return (read_spec(self.state, name) or {}).get("restarts", 0)

    def kill(self, name: str) -> int:
        """SIGKILL the main process of service `name` (as a crash or the OOM killer would); returns its pid."""
        pid = self.pid(name)
        assert pid is not None, f"{name} is not running: {processes.log_tail(self.state, name)}"
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, name: str, old_pid: int, killed_at: float) -> float:
        """Seconds from the kill until the supervisor had `name` running again."""
        while time.monotonic() - killed_at < RESTART_WITHIN_S:
            if self.pid(name) not in (None, old_pid):
                return time.monotonic() - killed_at
            time.sleep(0.2)
        raise AssertionError(f"{name} not restarted within {RESTART_WITHIN_S:.0f} s; supervisor log:\n"
                             f"{processes.log_tail(self.state, 'supervisor', 30)}")

    def wait_checkpoint(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not completed_checkpoints(self.cfg):
            assert time.monotonic() < deadline, "the stream job made no checkpoint:\n" + \
                processes.log_tail(self.state, "stream", 60)
            time.sleep(0.5)

    def database(self):
        import pymongo

        return pymongo.MongoClient(self.cfg.mongo_uri, serverSelectionTimeoutMS=30_000)[self.cfg.mongo.database]


class Feed:
    """ASD's test part, interleaved by time and looped (seq and ts keep increasing), sent in paced phases.

    Each phase's event times are moved one roll-up bucket further than the last's, so no roll-up bucket holds
    readings of two phases: a wrong bucket tells which fault it came from."""

    def __init__(self, cfg: Config):
        self.readings = order_by_time(open_reader("asd", cfg.data_dir / "asd" / "test.csv.gz"))
        self.bucket_ms = cfg.rollups.device_bucket_s * 1000
        self.offset = 0
        self.phases = 0
        self.sent: list[Reading] = []
        self.last_seq: dict[str, int] = {}   # per device, the newest seq handed to the producer

    def phase(self, cfg: Config, count: int) -> tuple[threading.Thread, dict]:
        """Start sending the next `count` readings at `RATE` in a thread; returns it and its result holder."""
        holder: dict = {}
        start, self.offset = self.offset, self.offset + count
        shift, self.phases = self.phases * self.bucket_ms, self.phases + 1

        def sent_as_they_go():
            for r in itertools.islice(replay(self.readings, loop=True), start, start + count):
                r = Reading(r.device_id, r.seq, r.ts + shift, r.metrics, r.label)
                yield r
                self.sent.append(r)  # once the producer has taken it
                self.last_seq[r.device_id] = r.seq

        def run():
            # The devices keep trying while the broker is away: a broker killed mid-phase can take longer than
            # `flead produce`'s 30 s to answer again on a loaded machine.
            with mock.patch.object(telemetry_producer, "FLUSH_TIMEOUT_S", RESTART_WITHIN_S):
                holder["result"] = produce(sent_as_they_go(), cfg.kafka.topics.telemetry, producer_config(cfg),
                                           key=signing_key(cfg), batch=MESSAGE_BATCH, rate=RATE,
                                           max_batch_delay_s=0.05)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread, holder

    def expected(self) -> set[tuple[str, int]]:
        return {(r.device_id, r.seq) for r in self.sent}


def finish_phase(thread: threading.Thread, holder: dict) -> ProduceResult:
    thread.join(timeout=RESTART_WITHIN_S + 120)
    assert not thread.is_alive(), "the producer did not finish"
    return holder["result"]


def _offsets(cfg: Config, topic: str, group: str | None) -> dict[int, int]:
    """Per partition of `topic`: the end offset (group None), or the offset `group` has committed (-1: none)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": group or "flead-chaos-ends",
                         "enable.auto.commit": False, "log_level": 0})
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]
        if group is None:
            return {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def _caught_up(cfg: Config, topic: str, group: str, ends: dict[int, int]) -> bool:
    from confluent_kafka import KafkaException

    try:
        committed = _offsets(cfg, topic, group)
    except KafkaException:  # the broker is still coming back
        return False
    return all(committed.get(partition, -1) >= end for partition, end in ends.items())


def wait_drained(pipeline: Pipeline) -> float:
    """Wait (up to `DRAIN_WITHIN_S`) until everything sent so far is stored: the stream job has committed the
    telemetry topic's end (it commits at each checkpoint, once its outputs for those readings are in Kafka), then
    the sink has committed the ends of the telemetry and scores topics (it commits only what it has stored).
    Kafka offsets answer in milliseconds; counting a large collection on the embedded MongoDB takes seconds."""
    import inspect

    from storage.sink import MongoSink

    cfg, topics = pipeline.cfg, pipeline.cfg.kafka.topics
    sink_group = inspect.signature(MongoSink).parameters["group_id"].default
    began = time.monotonic()

    def wait(topic: str, group: str, ends: dict[int, int]) -> None:
        while not _caught_up(cfg, topic, group, ends):
            assert time.monotonic() - began < DRAIN_WITHIN_S, f"{group} did not reach the end of {topic} within " \
                f"{DRAIN_WITHIN_S:.0f} s (committed {_offsets(cfg, topic, group)}, end {ends})"
            time.sleep(0.5)

    telemetry_end = _offsets(cfg, topics.telemetry, None)
    wait(topics.telemetry, cfg.stream.consumer_group, telemetry_end)
    wait(topics.scores, sink_group, _offsets(cfg, topics.scores, None))
    wait(topics.telemetry, sink_group, telemetry_end)
    return time.monotonic() - began


@dataclass
class Phase:
    """One paced phase: which readings it sent (``feed.sent[first:last]``), what it killed, how that went."""

    fault: str
    service: str | None
    first: int
    last: int = 0
    fault_seq: dict = field(default_factory=dict)  # per device, the newest seq sent before the kill
    restarts: int = 0
    recovery_s: float | None = None
    rejected: int = 0
    dead_letters: int = 0
    seconds: float = 0.0
    timeline: dict = field(default_factory=dict)  # event → seconds since the phase began


def run_phase(pipeline: Pipeline, feed: Feed, fault: str, service: str | None, readings: int,
              kill_at: float) -> Phase:
    """Send `readings` at `RATE`; after `kill_at` of them, SIGKILL `service` (None: no fault) and time how long
    the supervisor takes to bring it back; wait until everything sent so far is stored."""
    began = time.monotonic()
    db = pipeline.database()
    dead_before = db[pipeline.cfg.mongo.collections.dead_letters].count_documents({})
    phase = Phase(fault, service, first=len(feed.sent))
    thread, holder = feed.phase(pipeline.cfg, readings)
    if service is not None:
        while len(feed.sent) < phase.first + readings * kill_at:
            assert thread.is_alive(), "the producer stopped early"
            time.sleep(0.02)
        phase.fault_seq = dict(feed.last_seq)
        restarts = pipeline.restarts(service)
        killed_at = time.monotonic()
        phase.timeline["killed"] = killed_at - began
        phase.recovery_s = pipeline.wait_restarted(service, pipeline.kill(service), killed_at)
        phase.timeline["running again"] = time.monotonic() - began
    result = finish_phase(thread, holder)
    phase.timeline["all sent"] = time.monotonic() - began
    phase.last, phase.rejected = len(feed.sent), result.failed
    wait_drained(pipeline)
    phase.timeline["all stored"] = time.monotonic() - began
    if service is not None:
        phase.restarts = pipeline.restarts(service) - restarts
    phase.dead_letters = db[pipeline.cfg.mongo.collections.dead_letters].count_documents({}) - dead_before
    phase.seconds = time.monotonic() - began
    return phase


@dataclass
class Audit:
    """What one phase cost, checked against what is stored at the end."""

    row: PhaseResult
    lost: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    resets: list = field(default_factory=list)
    versions_before: int = 0
    rollups_off: dict = field(default_factory=dict)


def audit(pipeline: Pipeline, feed: Feed, phases: list[Phase]) -> dict[str, Audit]:
    """Read what is stored once and attribute every lost or duplicated reading, model-version reset and wrong
    roll-up bucket to the phase that sent the reading. Fills `RESULTS` (the printed table)."""
    db, cfg = pipeline.database(), pipeline.cfg
    predictions = stored_readings(db, cfg, "predictions")
    raw = stored_readings(db, cfg, "device_data")
    sent = {(r.device_id, r.seq) for r in feed.sent}
    unexpected = (set(predictions) | set(raw)) - sent
    assert not unexpected, f"stored readings that were never sent: {sorted(unexpected)[:5]}"
    off = rollup_mismatches(db, cfg, predictions)
    width = cfg.rollups.device_bucket_s * 1000
    audits = {}
    for phase in phases:
        keys = [(r.device_id, r.seq) for r in feed.sent[phase.first:phase.last]]
        mine = {key: predictions[key] for key in keys if key in predictions}
        buckets = set(rollup_buckets((copies[0] for copies in mine.values()), width))
        a = Audit(row=PhaseResult(phase.fault, len(keys), len(mine), 0, 0, phase.dead_letters, phase.rejected,
                                  phase.restarts, phase.recovery_s, 0, phase.seconds, phase.timeline),
                  lost=[key for key in keys if key not in predictions or key not in raw],
                  duplicated=[key for key in keys if len(predictions.get(key, ())) > 1 or len(raw.get(key, ())) > 1],
                  rollups_off={b: off[b] for b in buckets if b in off})
        if phase.fault_seq:
            sent_before = {k: v for k, v in predictions.items() if k[1] <= phase.fault_seq.get(k[0], -1)}
            a.resets = version_resets({**sent_before, **mine}, phase.fault_seq)
            a.versions_before = model_versions_before(predictions, phase.fault_seq)
        a.row.lost, a.row.duplicated, a.row.rollups_off = len(a.lost), len(a.duplicated), len(a.rollups_off)
        RESULTS.append(a.row)
        audits[phase.fault] = a
    return audits
