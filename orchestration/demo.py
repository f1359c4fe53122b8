"""`flead demo`: the whole federated pipeline on a real labelled data set, with a live line and a summary.

1. start the local stack and the services (Kafka → MongoDB sink, the Flink stream job, the aggregation
   scheduler, the global-model API, Superset);
2. replay each device's training part (devices learn online; snapshots flow out);
3. run a federated round (Spark); only then start the aggregation scheduler, so the two never race for a version;
4. replay the labelled test part, watching every score come back on the scores topic, plus a small share of
   malformed messages (the stream job dead-letters them; the data-quality dashboard shows them by reason); with
   it (and its training part before) a drifting copy of one device, whose normal turns noisier for good halfway
   through (`--drifting`: the drift monitor declares it, the dashboards show the drift event);
5. print throughput, latency, alerts and precision/recall/F1 against the labels; stop the data path and leave the
   dashboards (Superset and the database) up at the printed URL until `flead down` (`--keep-running`: leave all).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config import PROJECT_ROOT, Config, load_config
from config.arguments import non_negative, positive, share
from models.integrity import sign_device_message, signing_key, verify_message
from orchestration.report import utc
from telemetry.schema import decode_scores

DATA_PATH_SERVICES = ("stream", "scheduler", "api", "sink")  # stopped after the demo; the dashboards stay up


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline on a labelled data set and print a summary",
        description="Start the local stack and every service, replay each device's training part, run a federated "
                    "round, replay the labelled test part live, and print throughput, latency, alerts, accuracy and "
                    "incidents against the labels. The dashboards stay up until `flead down`. A second demo first "
                    "deletes what the last one left.")
    p.add_argument("--dataset", default="asd",
                   help="asd (default), or the path of your own multi-entity test CSV (device_id,timestamp,metrics...,label)")
    p.add_argument("--train", default=None, help="with a path --dataset: the training CSV (unlabelled, normal operation)")
    p.add_argument("--devices", type=non_negative(), default=0, help="use only the first N devices (0 = all)")
    p.add_argument("--train-per-device", type=non_negative(), default=2000, help="training readings per device (0 = all)")
    p.add_argument("--test-per-device", type=non_negative(), default=0, help="test readings per device (0 = all)")
    p.add_argument("--rate", type=positive(float), default=None, help="readings/s to replay at (default: as fast as possible)")
    p.add_argument("--batch", type=positive(int), default=None, help="readings per Kafka message (default: ingest.batch)")
    p.add_argument("--malformed", type=share, default=0.005, metavar="SHARE",
                   help="also send this share of malformed telemetry messages, as a real feed has (default 0.005; "
                        "0 = none): they become dead letters with reasons")
    p.add_argument("--drifting", type=non_negative(), default=1, metavar="N",
                   help="also replay N extra devices, each a copy of one of the data set's devices whose test part "
                        "turns noisier for good halfway through (a new normal, not an incident): the drift monitor "
                        "declares a drift and the device re-baselines (a young model, from a short --train-per-device, "
                        "absorbs the change without one). They count in no accuracy figure (default 1; 0 = none)")
    p.add_argument("--duration", type=positive(), default=None,
                   help="stop replaying the test part after this many seconds")
    p.add_argument("--timeout", type=positive(), default=900.0, help="give up waiting for scores after this many seconds")
    p.add_argument("--no-superset", action="store_true", help="do not start Superset")
    p.add_argument("--reset", action="store_true",
                   help="first delete the data this state directory's pipeline holds (topics, MongoDB database, "
                        "stream checkpoints and savepoints) even if no earlier demo stored it (an earlier demo's is "
                        "always deleted)")
    p.add_argument("--keep-running", action="store_true", help="leave every service running afterwards")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the summary as JSON")
    p.set_defaults(func=cmd_demo)


# --- watching the scores topic ---------------------------------------------------------------------------

@dataclass
class ScoreWatch:
    """Everything learned from the score records of this run."""

    count: int = 0
    anomalies: int = 0
    refused: int = 0  # score messages not signed with the deployment's key: left out of every figure
    max_global_version: int = 0
    latencies_ms: list = field(default_factory=list)
    seen: set = field(default_factory=set)
    test_records: list = field(default_factory=list)
    train_scores: dict = field(default_factory=lambda: defaultdict(list))  # device → scores of its training part
    test_started_at: float | None = None  # when the test part's replay began
    test_last_at: float | None = None     # when its last score arrived
    timeline: list = field(default_factory=list)  # (seconds since start, scores so far)


class ScoreWatcher(threading.Thread):
    """Consumes the scores topic from its current end; matches each score to the time its reading was sent. Only
    messages signed with the deployment's key count (as in the sink): a forged batch cannot change the summary."""

    def __init__(self, cfg: Config, sent_at: dict, test_keys: set):
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, TopicPartition

        self.watch = ScoreWatch()
        self.key = signing_key(cfg)
        self.sent_at, self.test_keys = sent_at, test_keys
        self.stopping = threading.Event()
        topic = cfg.kafka.topics.scores
        self.consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"flead-demo-{os.getpid()}",
                                  "enable.auto.commit": False, "log_level": 3})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [TopicPartition(topic, p, self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
                for p in partitions]
        self.consumer.assign(ends)
        self.started = time.monotonic()

    def run(self) -> None:
        w = self.watch
        while not self.stopping.is_set():
            for record in self.genuine_records(self.consumer.consume(2000, timeout=0.3)):
                key = (record["device_id"], record["seq"])
                if key in w.seen:  # at-least-once after a restart: count each reading once
                    continue
                now = time.time()
                w.seen.add(key)
                w.count += 1
                w.anomalies += bool(record["is_anomaly"])
                w.max_global_version = max(w.max_global_version, record.get("global_version") or 0)
                if key in self.test_keys:  # the training part's latency is mostly the job starting up
                    w.latencies_ms.append((now - self.sent_at[key]) * 1000.0)
                    w.test_records.append(record)
                    w.test_last_at = now
                else:
                    w.train_scores[record["device_id"]].append(record["score"])
            w.timeline.append((time.monotonic() - self.started, w.count))
        self.consumer.close()

    def genuine_records(self, messages) -> list[dict]:
        """The score records of the messages signed with the deployment's key; the others are counted."""
        records = []
        for msg in messages:
            if msg.error():
                continue
            if verify_message(msg.value() or b"", self.key) is not None:
                self.watch.refused += 1
                continue
            records.extend(decode_scores(msg.value()))
        return records


# --- the data -----------------------------------------------------------------------------------------------

def _load_readings(cfg: Config, args) -> tuple[list, list]:
    """(train readings, test readings), interleaved by time across devices, limited as the options say."""
    from telemetry.producer import order_by_time
    from telemetry.readers import MultiEntityCsvReader

    if args.dataset == "asd":
        train_path, test_path = cfg.data_dir / "asd" / "train.csv.gz", cfg.data_dir / "asd" / "test.csv.gz"
    else:
        test_path = Path(args.dataset)
        train_path = Path(args.train) if args.train else None
    for path in (train_path, test_path):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"flead demo: {path} does not exist")

    def limited(path, per_device: int, keep_devices: list | None) -> list:
        if path is None:
            return []
        taken: dict[str, int] = defaultdict(int)
        out = []
        for r in MultiEntityCsvReader(path):
            if keep_devices is not None and r.device_id not in keep_devices:
                continue
            if per_device and taken[r.device_id] >= per_device:
                continue
            taken[r.device_id] += 1
            out.append(r)
        return out

    test_all = limited(test_path, args.test_per_device, None)
    devices = list(dict.fromkeys(r.device_id for r in test_all))
    if args.devices:
        devices = devices[:args.devices]
        test_all = [r for r in test_all if r.device_id in devices]
    train = limited(train_path, args.train_per_device, devices)
    # test readings continue each device's sequence after its training readings
    offset = defaultdict(int)
    for r in train:
        offset[r.device_id] = max(offset[r.device_id], r.seq + 1)
    test = [type(r)(r.device_id, r.seq + offset[r.device_id], r.ts, r.metrics, r.label) for r in test_all]
    return order_by_time(train), order_by_time(test)


DRIFT_NOISE_SDS = 3.0  # the drifting copies' extra noise, in training standard deviations of each changed metric
DRIFT_STORED_WAIT_S = 15.0  # after every score is stored: how long to wait for the drifting copies' drift events
DAY_S = 86400
DEMO_MAX_RECENT_DAYS = 31  # the demo's charts over time show at most this much of each device's test part (a
                           # device summary holds an entry per hour and per 6 hours and metric of it)


@dataclass
class DriftingCopies:
    """Extra devices with a lasting change of regime (`drifting_copies`): their readings and what was changed."""

    train: list = field(default_factory=list)
    test: list = field(default_factory=list)
    devices: list = field(default_factory=list)  # {"device_id", "source", "changed_from_seq", "metrics"}


def drifting_copies(train: list, test: list, count: int, seed: int = 0) -> DriftingCopies:
    """`count` copies of the data set's devices (``<device>-drifting``), each with its source's readings, except that
    from the middle of its test part on every second metric that varied in training gets extra Gaussian noise of
    `DRIFT_NOISE_SDS` training standard deviations: a device whose normal became noisier for good (a bursty
    workload, a worn sensor), which the drift monitor should tell from an incident. Their test readings carry no
    label: they count in no accuracy figure."""
    copies = DriftingCopies()
    sources = sorted({r.device_id for r in test})
    rng = np.random.default_rng(seed)
    for source in sources[:count]:
        device = f"{source}-drifting"
        own_train = [r for r in train if r.device_id == source]
        own_test = sorted((r for r in test if r.device_id == source), key=lambda r: r.seq)
        names = list(own_test[0].metrics)
        reference = own_train or own_test[:len(own_test) // 2]
        values = np.array([[r.metrics.get(m, np.nan) for m in names] for r in reference], dtype=float)
        with np.errstate(invalid="ignore"):
            spread = np.nanstd(values, axis=0) if len(values) else np.zeros(len(names))
        varied = [i for i in range(len(names)) if np.isfinite(spread[i]) and spread[i] > 0]
        changed = varied[::2]
        half = len(own_test) // 2
        copies.train += [type(r)(device, r.seq, r.ts, r.metrics, None) for r in own_train]
        for k, r in enumerate(own_test):
            metrics = dict(r.metrics)
            if k >= half:
                for i in changed:
                    metrics[names[i]] = metrics[names[i]] + rng.normal(0.0, DRIFT_NOISE_SDS * spread[i])
            copies.test.append(type(r)(device, r.seq, r.ts, metrics, None))
        copies.devices.append({"device_id": device, "source": source,
                               "changed_from_seq": own_test[half].seq,
                               "metrics": [names[i] for i in changed]})
    return copies


# --- services -----------------------------------------------------------------------------------------------

def _flead(cfg: Config, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env={**os.environ, **cfg.to_env()},
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit(f"flead {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def _start_services(cfg: Config, with_superset: bool, say, reset: bool = False) -> None:
    from orchestration import stack

    stack.up(cfg, say=say)
    _start_empty(cfg, reset, say)
    for name in ("sink", "stream", "api"):  # the scheduler starts after the demo's own round
        say(_flead(cfg, name, "start").stdout.strip().splitlines()[-1])
    if with_superset:
        say(_flead(cfg, "superset", "start").stdout.strip().splitlines()[-1])


# --- a pipeline without data ------------------------------------------------------------------------------

RUN_MARKER = "demo-run.json"  # in the state directory: what the last demo left in this pipeline


def start_plan(stored: dict[str, int], left_by_demo: dict | None, reset: bool, state_dir) -> str:
    """What the demo does with the data this state directory's pipeline holds (`stored`: `stored_counts`):
    "fresh" (none), or "start over" (delete it first) when it is what the last demo left (`left_by_demo`: the counts
    it recorded; empty: a demo that did not finish) or on ``--reset``. It refuses (SystemExit) to replay over
    anything else: replayed readings reuse their devices' sequence numbers, which the stream job drops as already
    seen, and models that saw the data before would make the summary's figures dishonest.

    >>> start_plan({"telemetry messages": 0}, None, False, "var")
    'fresh'
    >>> start_plan({"telemetry messages": 9}, {"telemetry messages": 9}, False, "var")
    'start over'
    """
    if not any(stored.values()):
        return "fresh"
    if reset or (left_by_demo is not None and (not left_by_demo or left_by_demo == stored)):
        return "start over"
    since = " (more was added since the last demo)" if left_by_demo is not None else ""
    raise SystemExit(f"flead demo: the pipeline of {state_dir} holds data ({describe(stored)}) that no demo left"
                     f"{since}. The demo replays its devices from their first reading, which the stream job would "
                     "drop as already seen. `flead demo --reset` deletes that data first (the project's topics, "
                     "MongoDB database and stream checkpoints and savepoints); or give the demo a stack of its own: "
                     "FLEAD_STATE_DIR=<another folder> with free ports (FLEAD_KAFKA_PORT, FLEAD_MONGO_PORT, ...).")


def describe(stored: dict[str, int]) -> str:
    return "; ".join(f"{n:,} {what}" for what, n in stored.items() if n)


def stored_counts(cfg: Config) -> dict[str, int]:
    """What this state directory's pipeline holds: the stream job's checkpoints and savepoints, the telemetry topic's
    messages, the stored readings."""
    from confluent_kafka import Consumer, TopicPartition

    from flink_jobs.checkpoints import restore_points
    from storage.mongo import Store

    topic = cfg.kafka.topics.telemetry
    consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": "flead-demo-check", "log_level": 3})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        messages = sum(high - low for low, high in (consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                                   timeout=10) for p in partitions))
    finally:
        consumer.close()
    with Store(cfg) as store:
        readings = store.count_readings()
    return {"stream checkpoint(s) and savepoint(s)": len(restore_points(cfg)),
            f"message(s) on {topic}": messages, f"stored reading(s) in database {cfg.mongo.database}": readings}


def reset_data(cfg: Config, say) -> None:
    """Delete what this state directory's pipeline stored, its services stopped first: the project's topics
    (recreated empty), its MongoDB database (collections recreated), the stream job's checkpoints and savepoints."""
    import shutil

    from confluent_kafka.admin import AdminClient

    from flink_jobs.checkpoints import checkpoint_dir, savepoint_dir
    from orchestration import stack
    from services.service import stop_by_name
    from storage.mongo import Store

    for name in (*DATA_PATH_SERVICES, "router"):
        if stop_by_name(cfg.state_dir, name):
            say(f"stopped {name}")
    for folder in (checkpoint_dir(cfg), savepoint_dir(cfg)):
        shutil.rmtree(folder, ignore_errors=True)
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    topics = [name for name in cfg.kafka.topics.to_dict().values() if name in admin.list_topics(timeout=10).topics]
    for future in admin.delete_topics(topics, request_timeout=30).values():
        future.result()
    deadline = time.monotonic() + 60
    while set(topics) & set(admin.list_topics(timeout=10).topics):  # deletion completes asynchronously
        if time.monotonic() > deadline:
            raise SystemExit(f"flead demo: the topics {topics} were not deleted within 60 s")
        time.sleep(0.5)
    stack.ensure_topics(cfg)
    with Store(cfg) as store:
        store.client.drop_database(store.name)
        store.init()


def _start_empty(cfg: Config, reset: bool, say) -> None:
    """Make sure the demo starts on a pipeline without data (`start_plan`); the marker then says a demo runs."""
    marker = cfg.state_dir / RUN_MARKER
    stored = stored_counts(cfg)
    left = json.loads(marker.read_text()).get("left", {}) if marker.exists() else None
    if start_plan(stored, left, reset, cfg.state_dir) == "start over":
        say(f"data    {describe(stored)}: {'--reset' if reset else 'left by the last demo'}, deleted")
        reset_data(cfg, say)
    marker.write_text(json.dumps({"started_at": time.time(), "left": {}}) + "\n")


def _mark_left(cfg: Config) -> None:
    """Record what the demo left, so the next one deletes it only if nothing was added since (if the servers do
    not answer, the marker keeps saying a demo ran, which the next demo deletes)."""
    try:
        left = stored_counts(cfg)
    except Exception as exc:  # noqa: BLE001 - called while the demo ends, maybe on another error
        print(f"flead demo: could not count what the demo left ({exc})", file=sys.stderr)
        return
    (cfg.state_dir / RUN_MARKER).write_text(json.dumps({"finished_at": time.time(), "left": left}) + "\n")


def _snapshot_by_end_of_training(cfg: Config, train: list, say) -> Config:
    """The demo's round follows the training part, so every device must have sent a weight snapshot by then: a
    device snapshots every `stream.snapshot_every` readings (or `snapshot_interval_s`, checked only when it sends
    more), so with fewer training readings than that the demo lowers it to the smallest device's count."""
    counts: dict[str, int] = defaultdict(int)
    for r in train:
        counts[r.device_id] += 1
    fewest = min(counts.values(), default=cfg.stream.snapshot_every)
    if fewest >= cfg.stream.snapshot_every:
        return cfg
    say(f"stream.snapshot_every {cfg.stream.snapshot_every} -> {fewest} for this demo: a device with fewer training "
        "readings would send no weight snapshot before the federated round")
    return load_config(env={**os.environ, **cfg.to_env(), "FLEAD_STREAM_SNAPSHOT_EVERY": str(fewest)})


def _dashboards_cover_the_test_part(cfg: Config, test: list, say) -> Config:
    """The drill-down's score and metric charts and the fleet's anomaly rate over time show the newest
    `rollups.recent_s` of event time (a week: right for a live fleet). The demo's incidents are all over its test
    part (ASD: 15 days), so it widens that to the longest device's test part in whole days, up to
    `DEMO_MAX_RECENT_DAYS`, or an operator following the summary's incident lines would find most of them
    missing from the charts."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for r in test:
        first[r.device_id] = min(first.get(r.device_id, r.ts), r.ts)
        last[r.device_id] = max(last.get(r.device_id, r.ts), r.ts)
    span_s = max((last[d] - first[d] for d in first), default=0) / 1000
    # +1 day: the first bucket starts before its reading
    needed_s = min(math.ceil(span_s / DAY_S) + 1, DEMO_MAX_RECENT_DAYS) * DAY_S
    if needed_s <= cfg.rollups.recent_s:
        return cfg
    say(f"rollups.recent_s {cfg.rollups.recent_s / DAY_S:g} -> {needed_s / DAY_S:g} days for this demo: the "
        "dashboards' charts over time show each device's whole test part")
    return load_config(env={**os.environ, **cfg.to_env(), "FLEAD_ROLLUPS_RECENT_S": str(needed_s)})


def _wait_for(condition, timeout: float, what: str, progress=None, required: bool = True) -> None:
    """Wait until `condition` holds; `progress` (if any) reports every 2 s while waiting, and once when a wait
    ends (not when the condition held at once: the line would repeat the one before). Past `timeout` the demo
    ends with the reason, unless the wait was not `required`."""
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    waited = False
    while not condition():
        waited = True
        if time.monotonic() > deadline:
            if not required:
                return
            raise SystemExit(f"flead demo: timed out after {timeout:.0f} s waiting for {what}")
        if progress and time.monotonic() - last > 2.0:
            progress()
            last = time.monotonic()
        time.sleep(0.2)
    if progress and waited:
        progress()


def _produce(cfg: Config, readings: list, args, sent_at: dict, say, duration: float | None = None) -> int:
    from telemetry.producer import produce, producer_config

    def stamped():
        began = time.monotonic()
        for r in readings:
            if duration is not None and time.monotonic() - began > duration:
                return
            sent_at[(r.device_id, r.seq)] = time.time()
            yield r

    result = produce(stamped(), cfg.kafka.topics.telemetry, producer_config(cfg), key=signing_key(cfg),
                     batch=args.batch or cfg.ingest.batch, rate=args.rate, max_batch_delay_s=0.05,
                     progress=lambda line: say(f"  produce: {line}"))
    if result.failed:
        raise SystemExit(f"flead demo: {result.failed} messages were not delivered: {result.errors[:3]}")
    return result.readings


# Malformed telemetry, one of each kind in turn: what the stream job dead-letters (with these reasons). The device
# signs each one it can (a JSON object) with its token, except the last: a forged message, which nobody signed.
MALFORMED = (
    lambda device, seq: b"{not json",
    lambda device, seq: json.dumps({"schema": "flead.telemetry/1", "device_id": device, "seq": seq,
                                    "metrics": {"m00": 0.5}}).encode(),                       # missing 'ts'
    lambda device, seq: json.dumps({"schema": "flead.telemetry/1", "device_id": device, "seq": seq,
                                    "ts": 1_706_659_200_000, "metrics": {"m00": "high"}}).encode(),  # not a number
    lambda device, seq: json.dumps({"schema": "flead.telemetry/9", "device_id": device, "seq": seq,
                                    "ts": 1_706_659_200_000, "metrics": {"m00": 0.5}}).encode(),     # unknown schema
    lambda device, seq: json.dumps({"schema": "flead.telemetry/1", "device_id": device, "seq": -seq - 1,
                                    "ts": 1_706_659_200_000, "metrics": {"m00": 0.5}}).encode(),     # negative seq
    lambda device, seq: json.dumps({"schema": "flead.telemetry/1", "device_id": device, "seq": 2**62 + seq,
                                    "ts": 1_706_659_200_000, "metrics": {"m00": 0.5}}).encode(),     # unsigned
)
UNSIGNED_KINDS = (0, len(MALFORMED) - 1)  # not a JSON object (cannot be signed), forged


def _send_malformed(cfg: Config, devices: list[str], n_readings: int, args) -> int:
    """Send ``--malformed`` × the number of telemetry messages of the run (at least one of each kind) as malformed
    messages; returns how many."""
    from confluent_kafka import Producer

    if args.malformed <= 0:
        return 0
    messages = n_readings / (args.batch or cfg.ingest.batch)
    count = max(len(MALFORMED), int(round(messages * args.malformed)))  # at least one of each kind
    producer, key = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "log_level": 3}), signing_key(cfg)
    for i in range(count):
        device, kind = devices[i % len(devices)], i % len(MALFORMED)
        value = MALFORMED[kind](device, i)
        if kind not in UNSIGNED_KINDS:
            value = sign_device_message(value, key, device)
        producer.produce(cfg.kafka.topics.telemetry, key=device, value=value)
    if producer.flush(30):
        raise SystemExit("flead demo: the malformed messages were not all delivered")
    return count


# --- the summary --------------------------------------------------------------------------------------------

def ranking_quality(watch: ScoreWatch, labelled: list[dict]) -> dict:
    """ROC-AUC and PR-AUC of the raw test scores: pooled over the fleet after normalising each device's scores by
    its own training-part scores (no labels), and the mean over devices."""
    from models.evaluation import robust_normaliser
    from models.metrics import average_precision, roc_auc

    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in labelled:
        by_device[r["device_id"]].append(r)
    pooled_scores, pooled_labels, per_device = [], [], []
    for device, records in by_device.items():
        reference = np.array(watch.train_scores.get(device) or [r["score"] for r in records], dtype=float)
        scores = robust_normaliser(reference)(np.array([r["score"] for r in records], dtype=float))
        labels = np.array([r["label"] for r in records], dtype=int)
        pooled_scores.append(scores)
        pooled_labels.append(labels)
        if 0 < labels.sum() < len(labels):
            per_device.append((roc_auc(labels, scores), average_precision(labels, scores)))
    if not pooled_scores:
        return {}
    y, s = np.concatenate(pooled_labels), np.concatenate(pooled_scores)
    if not 0 < y.sum() < len(y):
        return {}
    means = np.mean(per_device, axis=0) if per_device else (None, None)
    return {"roc_auc": roc_auc(y, s), "pr_auc": average_precision(y, s),
            "roc_auc_device_mean": None if means[0] is None else float(means[0]),
            "pr_auc_device_mean": None if means[1] is None else float(means[1]), "anomaly_rate": float(y.mean())}


def incident_quality(labelled: list[dict], gap_readings: int) -> dict:
    """Event-level figures of the live flags (`models.metrics.event_counts`, pooled over devices): each device's
    flags in seq order grouped into incidents as the stream job groups them (`incidents.gap_readings`); an
    incident is true when it overlaps a labelled anomaly range, a range is detected when an incident overlaps it.
    ``stream_incident_ids``: the incidents the stream job itself linked these flags to (one notification each)."""
    from models.metrics import event_counts, event_metrics

    by_device: dict[str, list[dict]] = defaultdict(list)
    for r in labelled:
        by_device[r["device_id"]].append(r)
    totals: dict[str, int] = defaultdict(int)
    for records in by_device.values():
        records = sorted(records, key=lambda r: r["seq"])
        counts = event_counts(np.array([r["label"] for r in records], dtype=int),
                              np.array([r["is_anomaly"] for r in records], dtype=bool), gap_readings)
        for key, value in counts.items():
            totals[key] += value
    if not totals:
        return {}
    stream_ids = {r["incident_id"] for r in labelled if r["is_anomaly"] and r.get("incident_id")}
    return {**event_metrics(totals), "ranges": totals["ranges"], "detected_ranges": totals["detected_ranges"],
            "false_incidents": totals["incidents"] - totals["true_incidents"], "stream_incident_ids": len(stream_ids)}


def offline_reference(dataset: str) -> dict | None:
    """The federated row of `flead evaluate`'s stored report for the same data set (docs/results/<dataset>.json),
    to print beside the live figures; None when there is none (your own CSV)."""
    path = PROJECT_ROOT / "docs" / "results" / f"{dataset}.json"
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())["models"]["federated"]
    except (ValueError, KeyError):
        return None
    keys = ("f1", "precision", "recall", "roc_auc", "pr_auc", "incident_f1", "incident_precision", "incident_recall")
    return {"source": str(path.relative_to(PROJECT_ROOT)), **{k: row.get(k) for k in keys}}


def _over_threshold(record: dict) -> float:
    return record["score"] / max(record["threshold"], 1e-12)


def paged_incidents(labelled: list[dict], min_flagged: int, critical_ratio: float) -> dict:
    """Of the incidents the stream job linked these flags to, how many the router pages
    (`monitoring.notifications.worth_notifying` on each one's flags and peak) and how many of those have a flagged
    reading in a labelled anomaly range."""
    from monitoring.notifications import worth_notifying

    flags: dict[str, int] = defaultdict(int)
    peaks: dict[str, float] = {}
    labelled_ids: set[str] = set()
    for r in labelled:
        incident = r.get("incident_id")
        if r["is_anomaly"] and incident:
            flags[incident] += 1
            peaks[incident] = max(peaks.get(incident, 0.0), _over_threshold(r))
            if r["label"]:
                labelled_ids.add(incident)
    paged = [i for i, n in flags.items()
             if worth_notifying({"n_flagged": n, "peak_ratio": peaks[i]}, min_flagged, critical_ratio)]
    rule = f"{min_flagged} or more flagged readings, or a peak of {critical_ratio:g}× the threshold"
    return {"paged_incidents": len(paged), "paged_on_a_range": sum(i in labelled_ids for i in paged),
            "paging_rule": rule}


def strongest_incidents(records: list[dict], n: int = 5) -> list[dict]:
    """The `n` incidents with the highest peaks among flagged score records, one entry each (an operator is told
    once per incident): its peak alert (device, seq, times its threshold, metrics to blame), how many alerts it
    had, their seqs and the first one's event time (what the dashboards list incidents by). A flag without an
    incident id counts as an incident of its own."""
    incidents: dict[object, list[dict]] = defaultdict(list)
    for r in records:
        if r["is_anomaly"]:
            incidents[(r["device_id"], r.get("incident_id") or ("seq", r["seq"]))].append(r)
    peaks = sorted(((max(alerts, key=_over_threshold), alerts) for alerts in incidents.values()),
                   key=lambda peak_alerts: _over_threshold(peak_alerts[0]), reverse=True)[:n]
    return [{"device_id": peak["device_id"], "seq": peak["seq"], "ts": peak["ts"],
             "incident_id": peak.get("incident_id"), "alerts": len(alerts),
             "first_seq": min(r["seq"] for r in alerts), "last_seq": max(r["seq"] for r in alerts),
             "first_ts": min(r["ts"] for r in alerts),
             "score_over_threshold": round(_over_threshold(peak), 2),
             "metrics": [m["metric"] for m in peak.get("top_metrics", [])]} for peak, alerts in peaks]


def summarise(cfg: Config, watch: ScoreWatch, n_train: int, n_test: int, produce_seconds: float,
              malformed: int = 0, offline: dict | None = None, replay_rate: float | None = None,
              drifting: DriftingCopies | None = None) -> dict:
    """Throughput, latency, alerts and accuracy of the test part (scores from the stream, labels from the data),
    point-wise (no point adjustment) and per incident, beside ``offline`` (`offline_reference`); the drift events
    stored (`drift_summary`: where the `drifting` copies were declared drifted)."""
    from models.metrics import precision_recall_f1_from_predictions
    from storage.mongo import Store

    labelled = [r for r in watch.test_records if r.get("label") is not None]
    y_true = np.array([r["label"] for r in labelled], dtype=int)
    y_pred = np.array([r["is_anomaly"] for r in labelled], dtype=int)
    precision, recall, f1 = precision_recall_f1_from_predictions(y_true, y_pred) if labelled else (None, None, None)
    ranking = ranking_quality(watch, labelled)
    incidents = incident_quality(labelled, cfg.incidents.gap_readings)
    if incidents:
        incidents.update(paged_incidents(labelled, cfg.router.notify_min_flagged, cfg.router.critical_ratio))
    lat = np.array(watch.latencies_ms) if watch.latencies_ms else np.array([np.nan])
    span = (watch.test_last_at - watch.test_started_at) if watch.test_started_at and watch.test_last_at else 0.0
    top = strongest_incidents(watch.test_records)
    with Store(cfg) as store:
        latest = store.latest_global_model()
        rounds = store.collection("aggregation_history").count_documents({})
        dead_letters = store.collection("dead_letters").count_documents({})
        drift_events = store.find("drift_events", fields=["device_id", "seq"])
    return {
        "readings": {"train": n_train, "test": n_test, "scored": watch.count},
        "throughput_readings_per_s": round(len(watch.test_records) / span, 1) if span > 0 else None,
        "produce_seconds": round(produce_seconds, 1),
        "replay_rate": replay_rate,
        "latency_ms": {"p50": float(np.nanpercentile(lat, 50)), "p95": float(np.nanpercentile(lat, 95)),
                       "p99": float(np.nanpercentile(lat, 99))},
        "alerts": {"all": watch.anomalies, "test": int(y_pred.sum()) if labelled else None},
        "bad_input": {"malformed_sent": malformed, "dead_letters_stored": dead_letters,
                      "unsigned_scores_ignored": watch.refused},
        "test_accuracy": {"precision": precision, "recall": recall, "f1": f1, "points": len(labelled),
                          "anomalous_points": int(y_true.sum()) if labelled else None,
                          "note": "operating thresholds chosen online without labels; no point adjustment",
                          **ranking},
        "incident_accuracy": incidents,
        "offline": offline,
        "federated": {"rounds": rounds, "global_version": latest["version"] if latest else 0,
                      "adopted_version_in_scores": watch.max_global_version},
        "strongest_incidents": top,
        "drift": drift_summary(drifting.devices if drifting else [], drift_events),
        "dashboard": f"http://{cfg.superset.host}:{cfg.superset.port}/dashboard/list/",
        "credentials": str(cfg.state_dir / "superset" / "credentials"),
    }


def drift_summary(drifting: list[dict], events: list[dict]) -> dict:
    """The drifting copies (`DriftingCopies.devices`), each with the seqs at which the stream job declared a drift,
    and how many drift events the data set's own devices had."""
    declared: dict[str, list[int]] = defaultdict(list)
    for event in events:
        declared[event["device_id"]].append(int(event["seq"]))
    copies = {d["device_id"] for d in drifting}
    return {"copies": [{**d, "declared_at_seqs": sorted(declared.get(d["device_id"], []))} for d in drifting],
            "events": len(events), "events_on_other_devices": sum(len(seqs) for device, seqs in declared.items()
                                                                  if device not in copies)}


def print_summary(summary: dict) -> None:
    acc, lat = summary["test_accuracy"], summary["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print("\n================ FLEAD demo summary ================")
    print(f"readings     train {summary['readings']['train']:,}  test {summary['readings']['test']:,}  "
          f"scored {summary['readings']['scored']:,}")
    rate = summary["throughput_readings_per_s"]
    print(f"throughput   {'n/a' if rate is None else f'{rate:,.0f}'} readings/s (test part: replay start to last score)")
    paced = summary.get("replay_rate")
    how = (f"replayed at {paced:,.0f} readings/s" if paced else
           "replayed as fast as possible, so mostly time queued behind the backlog: `--rate 5000` paces it")
    print(f"latency      p50 {lat['p50']:.0f} ms  p95 {lat['p95']:.0f} ms  p99 {lat['p99']:.0f} ms (test part: sent → "
          f"scored; {how})")
    copies = " of the data set's own devices" if summary["drift"]["copies"] else ""
    print(f"alerts       {summary['alerts']['all']} in all, {summary['alerts']['test']} on the test part{copies}")
    print(f"accuracy     precision {fmt(acc['precision'])}  recall {fmt(acc['recall'])}  F1 {fmt(acc['f1'])}  "
          f"({acc['anomalous_points']} anomalous of {acc['points']} test points; {acc['note']})")
    inc = summary.get("incident_accuracy") or {}
    if inc:
        print(f"incidents    {inc['detected_ranges']} of {inc['ranges']} labelled anomaly ranges detected "
              f"(recall {fmt(inc['incident_recall'])}); {inc['incidents']} incidents raised, {inc['false_incidents']} "
              f"false (precision {fmt(inc['incident_precision'])}); incident F1 {fmt(inc['incident_f1'])}, "
              f"composite F1 {fmt(inc['composite_f1'])}; the stream job linked the test alerts to "
              f"{inc['stream_incident_ids']} incident(s)"
              + (f"; {inc['paged_incidents']} of them page ({inc['paging_rule']}), {inc['paged_on_a_range']} "
                 "of those with an alert in a labelled range" if "paged_incidents" in inc else ""))
    if acc.get("roc_auc") is not None:
        print(f"ranking      ROC-AUC {fmt(acc['roc_auc'])}  PR-AUC {fmt(acc['pr_auc'])} pooled (scores normalised per "
              f"device by its training part, no labels); per-device mean ROC-AUC {fmt(acc['roc_auc_device_mean'])}  "
              f"PR-AUC {fmt(acc['pr_auc_device_mean'])}; chance PR-AUC = {acc['anomaly_rate']:.3f}")
    off = summary.get("offline")
    if off:
        print(f"offline      `flead evaluate` ({off['source']}), federated: F1 {fmt(off['f1'])}  precision "
              f"{fmt(off['precision'])}  recall {fmt(off['recall'])}  ROC-AUC {fmt(off['roc_auc'])}  PR-AUC "
              f"{fmt(off['pr_auc'])}  incident F1 {fmt(off['incident_f1'])} (the whole data set, every training "
              "reading, a round every stream.snapshot_every readings per device)")
    bad = summary["bad_input"]
    ignored = bad.get("unsigned_scores_ignored")
    print(f"bad input    {bad['malformed_sent']} malformed messages sent; {bad['dead_letters_stored']} dead letters "
          "stored, each with its reason" + (f"; {ignored} score message(s) not signed by the job ignored"
                                            if ignored else ""))
    drift = summary["drift"]
    for copy in drift["copies"]:
        declared = copy["declared_at_seqs"]
        found = (f"drift declared at seq {', '.join(f'{seq:,}' for seq in declared)}, and the device re-baselined"
                 if declared else "no drift declared")
        print(f"drift        {copy['device_id']} (a copy of {copy['source']} with {len(copy['metrics'])} metrics "
              f"noisier from seq {copy['changed_from_seq']:,} on, a new normal): {found}")
    print(f"drift        {drift['events']} drift event(s) stored; {drift['events_on_other_devices']} on the data "
          "set's own devices")
    fed = summary["federated"]
    print(f"federated    {fed['rounds']} round(s); global model v{fed['global_version']}; "
          f"scores carry up to v{fed['adopted_version_in_scores']}")
    for incident in summary["strongest_incidents"]:  # one line each (`strongest_incidents`)
        alerts = incident["alerts"]
        span = (f"seq {incident['first_seq']}-{incident['last_seq']}, {alerts} alerts" if alerts > 1
                else f"seq {incident['seq']}, 1 alert")
        ratio = incident["score_over_threshold"]
        peak = f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"  # 3 significant figures, as the dashboards print
        print(f"  incident {incident['device_id']} from {utc(incident['first_ts'])} UTC, {span}: peak {peak}x "
              f"threshold (seq {incident['seq']}), "
              f"metrics to blame: {', '.join(incident['metrics'])}")
    if summary["dashboard"]:
        print(f"dashboards   {summary['dashboard']} (credentials: {summary['credentials']}); they stay up until "
              "`flead down`")


# --- the command --------------------------------------------------------------------------------------------

def cmd_demo(args, cfg: Config) -> int:
    say = lambda line: print(line, flush=True)  # noqa: E731
    # The demo replays recorded data: its event times are years old, which a live stream's window would refuse.
    cfg = load_config(env={**os.environ, **cfg.to_env(), "FLEAD_STREAM_TIMESTAMP_WINDOW_S": "0"})
    say("loading data ...")
    train, test = _load_readings(cfg, args)
    drifting = drifting_copies(train, test, args.drifting)
    if drifting.devices:
        from telemetry.producer import order_by_time

        train, test = order_by_time(train + drifting.train), order_by_time(test + drifting.test)
    devices = sorted({r.device_id for r in test})
    copies = f" ({len(drifting.devices)} of them a drifting copy)" if drifting.devices else ""
    say(f"{len(devices)} devices{copies}, {len(train):,} training and {len(test):,} test readings")
    cfg = _snapshot_by_end_of_training(cfg, train, say)
    cfg = _dashboards_cover_the_test_part(cfg, test, say)
    _start_services(cfg, not args.no_superset, say, reset=args.reset)
    from storage.mongo import Store

    store = Store(cfg)
    sent_at: dict = {}
    watcher = ScoreWatcher(cfg, sent_at, {(r.device_id, r.seq) for r in test})
    watcher.start()
    w = watcher.watch

    def live():
        if not w.count:  # the job's JVM and Python workers are still starting, or its first bundle is on its way
            say(f"  live: no scores yet, {time.monotonic() - began:.0f} s in (the stream job is starting)")
        else:
            say(f"  live: scored {w.count:,}, anomalies {w.anomalies:,}, global model in scores "
                f"v{w.max_global_version}")

    try:
        began = time.monotonic()
        say("phase 1: devices learn from their training data")
        _produce(cfg, train, args, sent_at, say)
        _wait_for(lambda: w.count >= len(train), args.timeout, "the training readings' scores", live)
        _wait_for(lambda: len({d["device_id"] for d in store.latest_local_models()}) >= min(
            len(devices), cfg.aggregation.min_devices), args.timeout, "weight snapshots in MongoDB", live)
        say("phase 2: a federated round (Spark)")
        say(_flead(cfg, "aggregate").stdout.strip())
        say(_flead(cfg, "scheduler", "start").stdout.strip().splitlines()[-1])  # later rounds: every few minutes
        say("phase 3: the labelled test data, scored live")
        w.test_started_at = time.time()
        produced = _produce(cfg, test, args, sent_at, say, duration=args.duration)
        malformed = _send_malformed(cfg, devices, len(train) + produced, args)
        test_keys = {(r.device_id, r.seq) for r in test[:produced]}
        _wait_for(lambda: test_keys <= w.seen, args.timeout, "every test reading's score", live)
        produce_seconds = time.monotonic() - began
        _wait_for(lambda: store.count_readings() >= w.count, args.timeout,
                  "the sink to store every score in MongoDB")
        _wait_for(lambda: store.count_readings("fleet_rollups") >= w.count, args.timeout,
                  "the sink to roll them up for the dashboards")
        _wait_for(lambda: store.collection("dead_letters").count_documents({}) >= malformed, args.timeout,
                  "the malformed messages' dead letters")
        drifted = {d["device_id"] for d in drifting.devices}  # a drift the job declared is stored soon after
        _wait_for(lambda: drifted <= {e["device_id"] for e in store.find("drift_events", fields=["device_id"])},
                  DRIFT_STORED_WAIT_S, "drift events", required=False)
        summary = summarise(cfg, w, len(train), produced, produce_seconds, malformed,
                            offline_reference(args.dataset) if args.dataset == "asd" else None, args.rate,
                            drifting)
    finally:
        watcher.stopping.set()
        watcher.join(timeout=5)
        store.close()
        if not args.keep_running:
            from services.service import stop_by_name

            for name in DATA_PATH_SERVICES:  # deregistered: the supervisor does not restart them
                if stop_by_name(cfg.state_dir, name):
                    say(f"stopped {name}")
        _mark_left(cfg)
        if not args.keep_running and (sys.exc_info()[0] is not None or args.no_superset):
            from orchestration import stack

            stack.down(cfg, say=say)  # else the dashboards stay up, with what they need
    if args.no_superset:
        summary["dashboard"] = None
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float))
    if args.keep_running:
        say("everything keeps running; `flead down` stops it")
    return 0
