"""End-to-end throughput and latency of the stream job (Kafka → PyFlink → Kafka) beside a plain-NumPy floor.

    .venv/bin/python bench/stream.py [--quick] [--json OUT]

Starts its own Kafka broker (temporary state dir, free ports), then:
1. throughput: preloads ASD readings (every device ``--fresh-copies`` times under new ids: 1,555,200 readings,
   about half a minute of scoring, so that a fresh job's one-off warm-up, its JVM compiling for the first tens of
   seconds, is inside the figure but does not make it) as per-device batch messages, runs the job ``--bounded`` and
   reports readings/s from the first to the last score (job start-up excluded) and the cores the job's JVM, its
   Python workers and the broker used over that window (``job_cores``), for the configured defaults and for
   ``--best`` (larger messages, plus any ``FLEAD_STREAM_*`` overrides given); the defaults also with the readings
   interleaved by event time across devices, as a fleet sends them live (the first run sends device after device,
   as `flead produce` replays a per-device file: only a few devices, so keys, are active at once), and on a short
   backlog (``--copies``: 155,520 readings, 5-6 s, nearly all of it the JVM's warm-up; the headline until 6
   December 2026). Each of these starts a fresh job, so its JVM's JIT compilers are at work while it is timed
   (cold); a deployed job is warm, so the short backlog is also fed again and again to one running job and timed
   after ``--warmup`` s of scoring (warm); and a warm fleet (``--fleet-devices``, 4,800 by default): so many
   devices that nearly every message is another device's, as in a deployed fleet, each message scored as its own
   micro-batch as live messages are;
2. latency: runs the job in the background, produces batch messages at a fixed rate below capacity, each
   reading stamped with its send time (producer linger 0), and reports p50/p99 of arrival − send time, where
   arrival is when a live consumer of the scores topic received the score (end to end: includes the sink and the
   broker), after ``--warmup`` (60) s of untimed warm-up; beside it ``scored_at`` − send time (inside the scorer), the
   broker's append time − send time, the cores the job's JVM, Python workers and the broker used while timed and
   the load average;
3. floor: `DeviceDetector.process_many` over the same readings in one process, same micro-batch size.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import PROJECT_ROOT, load_config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.integrity import sign_device_message, signing_key  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from telemetry.consumer import iter_messages  # noqa: E402
from telemetry.producer import order_by_time, produce, producer_config, replay  # noqa: E402
from telemetry.readers import open_reader  # noqa: E402
from telemetry.schema import Reading, decode_scores, encode_batch  # noqa: E402

JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"
RATE_STEP_MS = 10_000  # `scoring_rate` also gives the rate of each whole step of this length
SCORES_POLL_S = 0.5  # how often a wait for scores looks at those read so far (rates come from scored_at, not this)
BACKLOG_TIMEOUT_S = 300.0  # a warm backlog is scored in seconds (155,520 readings: 2-4 s) plus, the first, start-up


def asd_readings(cfg, per_device: int) -> list[Reading]:
    out, counts = [], {}
    for r in open_reader("asd", cfg.data_dir / "asd/test.csv.gz"):
        counts[r.device_id] = counts.get(r.device_id, 0) + 1
        if counts[r.device_id] <= per_device:
            out.append(r)
    return out


def device_copies(readings: list[Reading], copies: int, tag: str, keep_first: bool = False) -> list[Reading]:
    """`readings` `copies` times over, copy c under the device ids ``<id>-<tag><c>`` (copy 0 keeps the original ids
    when `keep_first`), copy after copy."""
    return [Reading(r.device_id if keep_first and c == 0 else f"{r.device_id}-{tag}{c}", r.seq, r.ts, r.metrics,
                    r.label) for c in range(copies) for r in readings]


def fleet_readings(cfg, devices: int, per_device: int) -> list[Reading]:
    """A fleet of at least `devices` devices (copies of the ASD servers under new ids), `per_device` readings
    each, device after device: a backlog in which each device sends a couple of messages, as in a large fleet where
    a worker meets many devices per bundle and few messages of each."""
    servers = asd_readings(cfg, per_device)
    return device_copies(servers, -(-devices // len({r.device_id for r in servers})), "f")


def fresh_topics(base_env: dict) -> tuple[dict, object]:
    """Env with unique topic names, and the Config it gives (topics created)."""
    suffix = uuid.uuid4().hex[:8]
    base = load_config(env={**os.environ, **base_env})
    env = {**base_env, **{f"FLEAD_KAFKA_TOPICS_{k.upper()}": f"{v}.{suffix}"
                          for k, v in base.kafka.topics.to_dict().items()}}
    cfg = load_config(env={**os.environ, **env})
    stack.ensure_topics(cfg)
    return env, cfg


def score_batches(cfg, timeout_s: float = 3.0) -> list[list[dict]]:
    """The score records of the scores topic, one list per message: the job sends one per micro-batch."""
    messages = iter_messages(cfg.kafka_bootstrap, cfg.kafka.topics.scores, from_beginning=True, timeout_s=timeout_s)
    return [decode_scores(m.value()) for m in messages]


def micro_batches(sizes: list[int], full: int) -> dict:
    """How the readings were batched: micro-batches, readings per micro-batch on average, and the share of the
    readings scored in micro-batches of `full` (``stream.backlog_micro_batch_size``) or more."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = max(int(sizes.sum()), 1)
    return {"micro_batches": int(sizes.size), "readings_per_micro_batch": round(float(sizes.mean()), 1) if sizes.size
            else 0.0, "share_in_full": round(float(sizes[sizes >= full].sum()) / total, 3)}


def throughput(base_env: dict, readings: list[Reading], message_batch: int, overrides: dict | None = None) -> dict:
    """Run the job `--bounded` over `readings` queued in fresh topics; readings/s from its first to its last score,
    the cores each process used over that window (`CpuSampler`) with the load average, and how the readings were
    batched (`micro_batches`)."""
    env, cfg = fresh_topics({**base_env, **(overrides or {})})
    produced = produce(readings, cfg.kafka.topics.telemetry, producer_config(cfg), key=signing_key(cfg),
                       batch=message_batch)
    assert produced.failed == 0, produced.errors
    started = time.monotonic()
    with subprocess.Popen([sys.executable, str(JOB), "--bounded"], env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as job:
        sampler = CpuSampler(job.pid, processes.running_pid(cfg.state_dir, stack.KAFKA))
        try:
            out, err = job.communicate()
        finally:
            sampler.close()
    if job.returncode != 0:
        raise RuntimeError(f"the bounded job failed:\n{out[-3000:]}\n{err[-3000:]}")
    wall = time.monotonic() - started
    batches = score_batches(cfg)
    scores = [record for batch in batches for record in batch]
    distinct = len({(s["device_id"], s["seq"]) for s in scores})
    return {"readings": len(readings), "distinct": distinct, "job_wall_s": wall, **scoring_rate(scores, sampler),
            **micro_batches([len(batch) for batch in batches], cfg.stream.backlog_micro_batch_size)}


def scoring_rate(scores: list[dict], sampler: "CpuSampler") -> dict:
    """Readings/s from the first to the last of `scores` (by ``scored_at``), the same for each whole 10 s from the
    first (``readings_per_s_by_10s``: how a fresh job speeds up as its JVM compiles), and the cores each process
    used over the whole window (`CpuSampler.cores_within`)."""
    at = np.array([s["scored_at"] for s in scores], dtype=np.int64)
    span_s = max((at.max() - at.min()) / 1000.0, 1e-3)
    whole = np.bincount((at - at.min()) // RATE_STEP_MS)[:int((at.max() - at.min()) // RATE_STEP_MS)]
    return {"scores": len(scores), "span_s": float(span_s), "readings_per_s": float(len(scores) / span_s),
            "readings_per_s_by_10s": [round(n * 1000 / RATE_STEP_MS) for n in whole.tolist()],
            **sampler.cores_within(int(at.min()), int(at.max()))}


def rate_after(scores: list[dict], since_ms: int, sampler: "CpuSampler") -> dict:
    """`scoring_rate` of the scores made at or after `since_ms` (e.g. once a whole backlog was queued, so the
    bench's own producing no longer shares the cores with the job); empty if fewer than two were."""
    later = [s for s in scores if s["scored_at"] >= since_ms]
    return scoring_rate(later, sampler) if len(later) >= 2 else {}


class Encoder:
    """Stands in for a confluent_kafka.Producer in `telemetry.producer.produce`: keeps each message as encoded and
    signed, and reports it delivered, so that a backlog is built before it is sent (`send_queued`) and the bench's
    encoding and signing do not share the cores with the job it times (devices encode their own messages)."""

    def __init__(self):
        self.messages: list[tuple[str, bytes, str]] = []  # (topic, value, key) in the order produced

    def produce(self, topic, value, key=None, on_delivery=None):
        self.messages.append((topic, value, key))
        if on_delivery is not None:
            on_delivery(None, None)

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        return 0

    def __len__(self) -> int:
        return 0


def send_queued(producer, messages: list[tuple[str, bytes, str]], at_ms: int) -> int:
    """Send `messages` (an `Encoder`'s), each with the Kafka timestamp `at_ms`, as if queued then; the number not
    acknowledged once all were answered."""
    failed = []

    def delivered(err, msg):
        if err is not None:
            failed.append(err)

    for topic, value, key in messages:
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=delivered, timestamp=at_ms)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                producer.poll(0.05)
    return producer.flush(30) + len(failed)


def warm_throughput(base_env: dict, readings: list[Reading], message_batch: int, warmup_s: float,
                    timed_backlogs: int = 1) -> dict:
    """`throughput` of a warm job: one job, started once, is fed `readings` as a backlog again and again (each time
    every device's seq and ts continue: `replay`, so nothing is dropped as a duplicate), each once the previous one
    is scored; untimed until the job has been scoring for `warmup_s`, then the next backlog is timed from its first
    to its last score. Each backlog is encoded and signed first (`Encoder`: the bench's Python did that beside the
    job while it scored, ~0.9 cores for 0.8 s of a 3.3 s backlog), then sent as it is, every message with the Kafka
    timestamp of `stream.backlog_lag_ms` before it was sent, so the job reads it as queued input (larger
    micro-batches), as the bounded runs do. The job starts on a backlog while it is still being sent, so the rate is
    also given from the moment the timed backlog was all queued to its last score (``after_queued``). With
    `timed_backlogs` > 1 that many backlogs in a row are timed and the median one is reported (single backlogs of
    one job varied 28,000-40,000 readings/s), each one's rates under ``timed``."""
    from confluent_kafka import Producer

    env, cfg = fresh_topics(base_env)
    state_dir = Path(env["FLEAD_STATE_DIR"])
    pid = processes.start(state_dir, "stream-warm", [sys.executable, str(JOB)], env=env)
    sampler = CpuSampler(pid, processes.running_pid(cfg.state_dir, stack.KAFKA))
    watcher = ScoreWatcher(cfg)
    producer, key = Producer(producer_config(cfg)), signing_key(cfg)
    backlogs = replay(readings, loop=True)
    try:
        scoring_since, read, backlog, timed_runs = None, 0, 0, []
        while len(timed_runs) < timed_backlogs:
            timed = scoring_since is not None and time.monotonic() - scoring_since >= warmup_s
            encoded = Encoder()
            built = produce(itertools.islice(backlogs, len(readings)), cfg.kafka.topics.telemetry, {}, key=key,
                            batch=message_batch, producer=encoded)
            assert built.failed == 0, built.errors
            sending = time.monotonic()
            unsent = send_queued(producer, encoded.messages, int(time.time() * 1000) - cfg.stream.backlog_lag_ms)
            assert unsent == 0, f"{unsent} of {len(encoded.messages)} messages not acknowledged"
            queued_ms, sending_s = int(time.time() * 1000), time.monotonic() - sending  # all acknowledged
            scores: list[dict] = []
            deadline, seen = time.monotonic() + BACKLOG_TIMEOUT_S, read
            while len(scores) < len(readings):
                if time.monotonic() > deadline or processes.running_pid(state_dir, "stream-warm") != pid:
                    raise RuntimeError(f"backlog {backlog}: {len(scores)} of {len(readings)} scored: "
                                       + processes.log_tail(state_dir, "stream-warm"))
                time.sleep(SCORES_POLL_S)
                if scoring_since is None and watcher.received:
                    scoring_since = time.monotonic()
                if len(watcher.received) != seen:  # still arriving: decoding now would take CPU from the job
                    seen = len(watcher.received)
                    continue
                arrived = list(watcher.received)[read:]
                read += len(arrived)
                scores += [record for _, _, value in arrived for record in decode_scores(value)]
            backlog += 1
            if timed:
                timed_runs.append({**scoring_rate(scores, sampler), "after_queued": {
                    "sending_s": round(sending_s, 2), **rate_after(scores, queued_ms, sampler)}})
    finally:
        sampler.close()
        watcher.close()
        processes.stop(state_dir, "stream-warm", grace=5)
    return {"readings": len(readings), "devices": len({r.device_id for r in readings}), "warmup_s": warmup_s,
            "backlogs_untimed": backlog - len(timed_runs), **median_backlog(timed_runs)}


def median_backlog(timed_runs: list[dict]) -> dict:
    """The timed backlog of median readings/s (the upper one of an even count), with every backlog's rates under
    ``timed`` in the order they ran."""
    median = sorted(timed_runs, key=lambda run: run["readings_per_s"])[len(timed_runs) // 2]
    return {**median, "timed": [{"readings_per_s": round(run["readings_per_s"]),
                                 "after_queued": round(run["after_queued"].get("readings_per_s", 0))}
                                for run in timed_runs]}


def session_cpu_s(session: int, broker: int | None = None) -> dict[str, float]:
    """CPU seconds used so far by the processes of a session (the stream job's: its JVM, its Python workers, the
    submitting Python), by kind, and by the session `broker` (the Kafka broker's) as ``broker``; empty where there
    is no /proc. Processes that have exited are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
            if int(fields[3]) not in (session, broker):
                continue
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        kind = ("broker" if int(fields[3]) == broker else "jvm" if b"java" in command.split(b"\0")[0]
                else "python_workers" if b"beam_boot" in command else "other")
        used[kind] = used.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def cores_between(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Average cores each kind of process used between two `session_cpu_s` samples `seconds` apart."""
    return {kind: round((after[kind] - before.get(kind, 0.0)) / seconds, 2) for kind in sorted(after)}


class CpuSampler:
    """Samples `session_cpu_s` of a job's session and the broker's, and this process's own CPU time (``bench``),
    every `period_s` in a thread, so that the cores used over a window known only afterwards (a bounded run's
    first to last score) can be given: `cores_within`. The Python workers exit at the run's end, so their CPU can
    only be read while they run."""

    def __init__(self, session: int, broker: int | None, period_s: float = 0.25):
        self.session, self.broker, self.period_s = session, broker, period_s
        self.samples: list[tuple[int, dict[str, float]]] = []  # (wall ms, CPU s by kind)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(self.period_s):
            used = session_cpu_s(self.session, self.broker)
            used["bench"] = time.process_time()
            self.samples.append((int(time.time() * 1000), used))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()

    def cores_within(self, start_ms: int, end_ms: int) -> dict:
        """``job_cores``: the cores each kind of process used between the first and the last sample taken from
        `start_ms` to `end_ms` (``cpu_window_s`` long), and the load average at the end (empty if fewer than two
        samples fell in the window)."""
        inside = [(at, used) for at, used in self.samples if start_ms <= at <= end_ms]
        if len(inside) < 2:
            return {}
        (first_at, first), (last_at, last) = inside[0], inside[-1]
        seconds = (last_at - first_at) / 1000.0
        return {"job_cores": cores_between(first, last, seconds), "cpu_window_s": seconds,
                "load_average": round(os.getloadavg()[0], 1)}


class ScoreWatcher:
    """Reads the scores topic live from its start in a thread and stamps each record with the wall time it
    arrived (the consumer waits at most 10 ms for a fetch), so latency includes the sink and the broker."""

    def __init__(self, cfg):
        import threading
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10, "fetch.min.bytes": 1})
        topic = cfg.kafka.topics.scores
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(partitions)])
        self.received: list[tuple[int, int, bytes]] = []  # (arrival ms, broker append ms, value)
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping:  # poll returns each record as it arrives (consume(n, t) waits t for n of them)
            msg = self.consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                self.received.append((int(time.time() * 1000), msg.timestamp()[1], msg.value()))

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.consumer.close()


def latency(base_env: dict, readings: list[Reading], rate: float, seconds: float, message_batch: int,
            warmup_s: float = 60.0, raw_out: str | None = None) -> dict:
    """Produce at `rate` readings/s into a running job, untimed for `warmup_s` (for about a minute after start-up
    the JVM's C2 compiler takes half a core beside the job: 0.58–0.68 cores used by the JVM 10–30 s after start,
    0.22 after 60 s, at 5,000 readings/s), then timed for `seconds`; each reading's ts is its send time
    (the producer sends at once: linger 0). Reports, per reading, ``scored_at`` − ts (in the scorer), the broker's
    append time − ts, and arrival − ts (read back from the scores topic by a live consumer: the end-to-end figure);
    beside them the cores the job's processes used while timed and the machine's load average (other work on the
    machine takes cores from the job: latency figures are comparable only at a similar load). `raw_out`: also save
    every timed reading's figures there (NumPy .npz)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    env, cfg = fresh_topics(base_env)
    # the broker stamps each score record when it appends it: the sink's hop, apart from the consumer's
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, cfg.kafka.topics.scores, incremental_configs=[
        ConfigEntry("message.timestamp.type", "LogAppendTime", incremental_operation=AlterConfigOpType.SET)])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result()
    state_dir = Path(env["FLEAD_STATE_DIR"])
    pid = processes.start(state_dir, "stream-bench", [sys.executable, str(JOB)], env=env)
    broker = processes.running_pid(cfg.state_dir, stack.KAFKA)
    producer, key = Producer(producer_config(cfg, **{"linger.ms": 0})), signing_key(cfg)
    watcher = ScoreWatcher(cfg)
    try:
        by_device: dict[str, list[Reading]] = {}
        for r in readings:
            by_device.setdefault(r.device_id, []).append(r)
        devices = sorted(by_device)
        position = {d: 0 for d in devices}
        seq = {d: 0 for d in devices}

        def send_round() -> int:
            for d in devices:
                sent_at = int(time.time() * 1000)
                rows = by_device[d][position[d]:position[d] + message_batch] or by_device[d][:message_batch]
                position[d] = (position[d] + message_batch) % len(by_device[d])
                batch = [Reading(d, seq[d] + i, sent_at, r.metrics, r.label) for i, r in enumerate(rows)]
                seq[d] += len(batch)
                producer.produce(cfg.kafka.topics.telemetry, sign_device_message(encode_batch(d, batch), key, d), key=d)
            producer.poll(0)
            return len(devices) * message_batch

        send_round()  # wait for the job to be up before timing anything
        producer.flush(10)
        deadline = time.monotonic() + 180
        while not watcher.received:
            if time.monotonic() > deadline or processes.running_pid(state_dir, "stream-bench") != pid:
                raise RuntimeError("the stream job did not start: " + processes.log_tail(state_dir, "stream-bench"))
            time.sleep(0.2)
        interval = len(devices) * message_batch / rate
        began = time.monotonic()
        next_round, sent, first_timed = began, 0, None
        while time.monotonic() - began < warmup_s + seconds:
            if first_timed is None and time.monotonic() - began >= warmup_s:
                first_timed, sent = dict(seq), 0  # steady state from here: the warm-up is not timed
                cpu_before, timed_from, load_before = session_cpu_s(pid, broker), time.monotonic(), os.getloadavg()[0]
            sent += send_round()
            next_round += interval
            time.sleep(max(0.0, next_round - time.monotonic()))
        job_cores = cores_between(cpu_before, session_cpu_s(pid, broker), time.monotonic() - timed_from)
        load = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        producer.flush(10)
        expected = sum(seq[d] - first_timed[d] for d in devices)
        deadline = time.monotonic() + 60
        timed: list[tuple[int, int, dict]] = []
        while time.monotonic() < deadline:
            timed = [(at, appended, s) for at, appended, s in
                     ((at, appended, s) for at, appended, v in list(watcher.received) for s in decode_scores(v))
                     if s["seq"] >= first_timed[s["device_id"]]]
            if len(timed) >= expected:
                break
            time.sleep(SCORES_POLL_S)
        scored = np.array([s["scored_at"] - s["ts"] for _, _, s in timed], dtype=np.float64)
        appended = np.array([appended - s["ts"] for _, appended, s in timed], dtype=np.float64)
        arrived = np.array([at - s["ts"] for at, _, s in timed], dtype=np.float64)
        sent_s = np.array([s["ts"] for _, _, s in timed], dtype=np.int64)
        if raw_out:
            np.savez(raw_out, ts=sent_s, scored=scored, appended=appended, arrived=arrived,
                     device=np.array([s["device_id"] for _, _, s in timed]),
                     seq=np.array([s["seq"] for _, _, s in timed]))
        sent_s = (sent_s - sent_s.min()) // 1000
        seconds_sent = [i for i in range(int(sent_s.max()) + 1) if (sent_s == i).any()]
        by_second = [round(float(np.percentile(arrived[sent_s == i], 99))) for i in seconds_sent]
        scored_by_second = [round(float(np.percentile(scored[sent_s == i], 99))) for i in seconds_sent]
        return {"rate": rate, "seconds": seconds, "warmup_s": warmup_s, "sent": sent, "scored": len(timed),
                "job_cores": job_cores, "load_average": load,
                "p99_ms_by_second": by_second, "scored_at_p99_ms_by_second": scored_by_second,
                "p50_ms": float(np.percentile(arrived, 50)), "p99_ms": float(np.percentile(arrived, 99)),
                "max_ms": float(arrived.max()),
                "scored_at_p50_ms": float(np.percentile(scored, 50)),
                "scored_at_p99_ms": float(np.percentile(scored, 99)),
                "appended_p50_ms": float(np.percentile(appended, 50)),
                "appended_p99_ms": float(np.percentile(appended, 99))}
    finally:
        watcher.close()
        processes.stop(state_dir, "stream-bench", grace=5)


def numpy_floor(cfg, readings: list[Reading], micro_batch: int) -> float:
    """`DeviceDetector.process_many` per device in micro-batches, one process, readings/s."""
    by_device: dict[str, list[Reading]] = {}
    for r in readings:
        by_device.setdefault(r.device_id, []).append(r)
    names = list(readings[0].metrics)
    matrices = {d: np.array([[r.metrics[n] for n in names] for r in rs]) for d, rs in by_device.items()}
    times = {d: np.array([r.ts for r in rs], dtype=np.int64) for d, rs in by_device.items()}
    detectors = {d: DeviceDetector.create(names, cfg) for d in matrices}
    started = time.perf_counter()
    for d, X in matrices.items():
        for i in range(0, X.shape[0], micro_batch):
            detectors[d].process_many(X[i:i + micro_batch], ts=times[d][i:i + micro_batch])
    return len(readings) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer readings, shorter latency run, warm run timed on its second backlog")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--message-batch", type=int, default=16, help="readings per telemetry message")
    parser.add_argument("--rate", type=float, default=5000.0, help="latency run: readings/s produced")
    parser.add_argument("--copies", type=int, default=3,
                        help="short fresh run and the warm runs' backlog: each ASD device this many times")
    parser.add_argument("--fresh-copies", type=int, default=30,
                        help="fresh (bounded) runs: each ASD device this many times (30: 1,555,200 readings; with "
                             "--quick: --copies)")
    parser.add_argument("--best-message-batch", type=int, default=64, help="best run: readings per message")
    parser.add_argument("--best", default="", metavar="KEY=VALUE,...",
                        help="best run: FLEAD_* overrides, e.g. FLEAD_STREAM_MICRO_BATCH_SIZE=64")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="latency and warm runs: seconds the job scores before timing (the job's JVM compiles "
                             "with C2 for about a minute after start-up: with 10 s the timed window measured that); "
                             "with --quick the warm run times its second backlog")
    parser.add_argument("--warm-backlogs", type=int, default=5,
                        help="warm and fleet runs: backlogs timed in a row after the warm-up; the median one is "
                             "reported (with --quick: 1)")
    parser.add_argument("--fleet-devices", type=int, default=4800,
                        help="fleet run: devices (copies of the 12 ASD servers) of a warm run in which nearly every "
                             "message is another device's, scored as live messages are (backlog micro-batches "
                             "off: a message of stream.micro_batch_size readings or more is one micro-batch); 0: "
                             "no fleet run")
    parser.add_argument("--fleet-readings", type=int, default=32,
                        help="fleet run: readings per device in each backlog (two 16-reading messages)")
    parser.add_argument("--latency-raw", metavar="OUT.npz", help="save every timed reading's latency figures here")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    warm_backlogs = 1 if args.quick else max(1, args.warm_backlogs)
    timed_what = f"median of {warm_backlogs} backlogs" if warm_backlogs > 1 else "one backlog"
    best_env = dict(kv.split("=", 1) for kv in args.best.split(",") if kv)

    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-stream-"))
    base_env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_KAFKA_PORT": str(processes.free_port()),
                "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port()),
                "FLEAD_STREAM_TIMESTAMP_WINDOW_S": "0"}  # a replay of recorded ASD data
    cfg = load_config(env={**os.environ, **base_env})
    try:
        stack.start_kafka(cfg)
        readings = asd_readings(cfg, 1000 if args.quick else 4320)
        floor = numpy_floor(cfg, readings, cfg.stream.micro_batch_size)
        many = device_copies(readings, args.copies, "x", keep_first=True)
        long = many if args.quick else device_copies(readings, args.fresh_copies, "x", keep_first=True)
        thr = throughput(base_env, long, args.message_batch)
        live_order = throughput(base_env, order_by_time(long), args.message_batch)
        best = throughput(base_env, long, args.best_message_batch, best_env)
        short = thr if args.quick else throughput(base_env, many, args.message_batch)
        warm = warm_throughput(base_env, many, args.message_batch, 0.0 if args.quick else args.warmup, warm_backlogs)
        live_batches = {"FLEAD_STREAM_BACKLOG_MICRO_BATCH_SIZE": str(cfg.stream.micro_batch_size)}
        fleet = (warm_throughput({**base_env, **live_batches},
                                 fleet_readings(cfg, args.fleet_devices, args.fleet_readings),
                                 args.message_batch, 0.0 if args.quick else args.warmup, warm_backlogs)
                 if args.fleet_devices else {})
        lat = latency(base_env, readings, args.rate, 10.0 if args.quick else 30.0, 10, warmup_s=args.warmup,
                      raw_out=args.latency_raw)
    finally:
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    rows = [
        {"name": "NumPy floor: DeviceDetector.process_many, 1 process", "value": round(floor), "unit": "readings/s"},
        {"name": f"stream job bounded, fresh, defaults (parallelism {cfg.stream.parallelism}), "
                 f"{args.message_batch}-reading messages, {len(long):,} readings",
         "value": round(thr["readings_per_s"]), "unit": "readings/s"},
        *([{"name": "  ... its first 10 s (the JVM compiling)", "value": thr["readings_per_s_by_10s"][0],
            "unit": "readings/s"}] if thr["readings_per_s_by_10s"] else []),
        {"name": "  ... the same readings interleaved by event time across devices (as a fleet sends live)",
         "value": round(live_order["readings_per_s"]), "unit": "readings/s"},
        *({"name": f"  ... readings per micro-batch, {what}", "value": run["readings_per_micro_batch"],
           "unit": "readings"} for what, run in (("device after device", thr), ("interleaved", live_order))),
        {"name": f"stream job bounded, best: {args.best_message_batch}-reading messages {args.best}".rstrip(),
         "value": round(best["readings_per_s"]), "unit": "readings/s"},
        *([] if short is thr else [
            {"name": f"  ... fresh job, {args.message_batch}-reading messages, a short backlog of {len(many):,} "
                     "readings (mostly the JVM's warm-up)",
             "value": round(short["readings_per_s"]), "unit": "readings/s"}]),
        {"name": f"  ... warm job: the {args.message_batch}-reading backlog fed again to one job, timed after "
                 f"{warm['warmup_s']:.0f} s of scoring, {timed_what} (the rows above time a "
                 "fresh, cold job)",
         "value": round(warm["readings_per_s"]), "unit": "readings/s"},
        {"name": "  ... that backlog from when it was all queued (the bench no longer sending) to its last score",
         "value": round(warm["after_queued"].get("readings_per_s", 0)), "unit": "readings/s"},
        *([{"name": f"  ... warm job, a fleet of {fleet['devices']:,} devices ({args.fleet_readings} readings each "
                    f"per backlog, micro-batches of {max(args.message_batch, cfg.stream.micro_batch_size)} as "
                    f"live: no backlog batches; {timed_what})",
            "value": round(fleet["after_queued"].get("readings_per_s", 0)), "unit": "readings/s"}] if fleet else []),
        {"name": f"event-to-score latency p50 at {args.rate:.0f} readings/s (score read from Kafka, after "
                 f"{args.warmup:.0f} s warm-up)",
         "value": round(lat["p50_ms"]), "unit": "ms"},
        {"name": f"event-to-score latency p99 at {args.rate:.0f} readings/s (score read from Kafka)",
         "value": round(lat["p99_ms"]), "unit": "ms"},
        {"name": f"  ... event to scored_at (in the scorer) p50 at {args.rate:.0f} readings/s",
         "value": round(lat["scored_at_p50_ms"]), "unit": "ms"},
        {"name": f"  ... event to scored_at (in the scorer) p99 at {args.rate:.0f} readings/s",
         "value": round(lat["scored_at_p99_ms"]), "unit": "ms"},
    ]
    print(f"{'measure':<72} {'value':>10}  unit")
    for row in rows:
        print(f"{row['name']:<72} {row['value']:>10,}  {row['unit']}")
    print(f"throughput run: {thr}\ninterleaved run: {live_order}\nbest run: {best}\nshort run: {short}\n"
          f"warm run: {warm}\n"
          f"fleet run: {fleet}\nlatency run: {lat}")
    result = {"headline": {"name": f"stream job readings/s end to end (Kafka → PyFlink → Kafka), a fresh job, "
                                   f"{args.message_batch}-reading messages",
                           "value": round(thr["readings_per_s"]), "unit": "readings/s", "floor": round(floor)},
              "rows": rows, "throughput": thr, "interleaved": live_order, "short": short,
              "best": {**best, "message_batch": args.best_message_batch, "overrides": best_env}, "warm": warm,
              "fleet": fleet,
              "latency": lat,
              "settings": {k: cfg.stream[k] for k in ("parallelism", "micro_batch_size", "bundle_size",
                                                       "bundle_time_ms", "micro_batch_timeout_ms",
                                                       "buffer_timeout_ms", "sink_linger_ms")}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
