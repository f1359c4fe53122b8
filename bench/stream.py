"""End-to-end throughput and latency of the stream job (Kafka → PyFlink → Kafka) beside a plain-NumPy floor.

    .venv/bin/python bench/stream.py [--quick] [--json OUT]

Starts its own Kafka broker (temporary state dir, free ports), then:
1. throughput: preloads N ASD readings (every device ``--copies`` times under new ids, so the steady state lasts
   long enough to measure) as per-device batch messages, runs the job ``--bounded`` and reports readings/s from the
   first to the last score (job start-up excluded), for the configured defaults and for ``--best`` (larger
   messages, plus any ``FLEAD_STREAM_*`` overrides given);
2. latency: runs the job in the background, produces batch messages at a fixed rate below capacity, each
   reading stamped with its send time (producer linger 0), and reports p50/p99 of arrival − send time, where
   arrival is when a live consumer of the scores topic received the score (end to end: includes the sink and the
   broker), after 10 s of untimed warm-up; beside it ``scored_at`` − send time (inside the scorer) and the
   broker's append time − send time;
3. floor: `DeviceDetector.process_many` over the same readings in one process, same micro-batch size.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import write_json  # noqa: E402  (beside this script)
from config import PROJECT_ROOT, load_config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from telemetry.consumer import iter_messages  # noqa: E402
from telemetry.producer import produce, producer_config  # noqa: E402
from telemetry.readers import open_reader  # noqa: E402
from telemetry.schema import Reading, decode_scores, encode_batch  # noqa: E402

JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"


def asd_readings(cfg, per_device: int) -> list[Reading]:
    out, counts = [], {}
    for r in open_reader("asd", cfg.data_dir / "asd/test.csv.gz"):
        counts[r.device_id] = counts.get(r.device_id, 0) + 1
        if counts[r.device_id] <= per_device:
            out.append(r)
    return out


def fresh_topics(base_env: dict) -> tuple[dict, object]:
    """Env with unique topic names, and the Config it gives (topics created)."""
    suffix = uuid.uuid4().hex[:8]
    base = load_config(env={**os.environ, **base_env})
    env = {**base_env, **{f"FLEAD_KAFKA_TOPICS_{k.upper()}": f"{v}.{suffix}"
                          for k, v in base.kafka.topics.to_dict().items()}}
    cfg = load_config(env={**os.environ, **env})
    stack.ensure_topics(cfg)
    return env, cfg


def scores_of(cfg, timeout_s: float = 3.0) -> list[dict]:
    messages = iter_messages(cfg.kafka_bootstrap, cfg.kafka.topics.scores, from_beginning=True, timeout_s=timeout_s)
    return [record for m in messages for record in decode_scores(m.value())]


def throughput(base_env: dict, readings: list[Reading], message_batch: int, overrides: dict | None = None) -> dict:
    env, cfg = fresh_topics({**base_env, **(overrides or {})})
    produced = produce(readings, cfg.kafka.topics.telemetry, producer_config(cfg), batch=message_batch)
    assert produced.failed == 0, produced.errors
    started = time.monotonic()
    job = subprocess.run([sys.executable, str(JOB), "--bounded"], env={**os.environ, **env}, capture_output=True,
                         text=True)
    if job.returncode != 0:
        raise RuntimeError(f"the bounded job failed:\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}")
    wall = time.monotonic() - started
    scores = scores_of(cfg)
    at = np.array([s["scored_at"] for s in scores], dtype=np.int64)
    span_s = max((at.max() - at.min()) / 1000.0, 1e-3)
    distinct = len({(s["device_id"], s["seq"]) for s in scores})
    return {"readings": len(readings), "scores": len(scores), "distinct": distinct, "span_s": float(span_s),
            "readings_per_s": float(len(scores) / span_s), "job_wall_s": wall}


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
        while not self.stopping:
            for msg in self.consumer.consume(10000, 0.05):
                if msg.error() is None:
                    self.received.append((int(time.time() * 1000), msg.timestamp()[1], msg.value()))

    def close(self) -> None:
        self.stopping = True
        self.thread.join()
        self.consumer.close()


def latency(base_env: dict, readings: list[Reading], rate: float, seconds: float, message_batch: int,
            warmup_s: float = 10.0) -> dict:
    """Produce at `rate` readings/s into a running job, untimed for `warmup_s` (the first seconds after start-up
    run JIT compilers and fill caches: p99 1.5–2 s), then timed for `seconds`; each reading's ts is its send time
    (the producer sends at once: linger 0). Reports, per reading, ``scored_at`` − ts (in the scorer), the broker's
    append time − ts, and arrival − ts (read back from the scores topic by a live consumer: the end-to-end figure)."""
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
    producer = Producer(producer_config(cfg, **{"linger.ms": 0}))
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
                producer.produce(cfg.kafka.topics.telemetry, encode_batch(d, batch), key=d)
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
            sent += send_round()
            next_round += interval
            time.sleep(max(0.0, next_round - time.monotonic()))
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
            time.sleep(0.5)
        scored = np.array([s["scored_at"] - s["ts"] for _, _, s in timed], dtype=np.float64)
        appended = np.array([appended - s["ts"] for _, appended, s in timed], dtype=np.float64)
        arrived = np.array([at - s["ts"] for at, _, s in timed], dtype=np.float64)
        sent_s = np.array([s["ts"] for _, _, s in timed], dtype=np.int64)
        sent_s = (sent_s - sent_s.min()) // 1000
        by_second = [round(float(np.percentile(arrived[sent_s == i], 99))) for i in range(int(sent_s.max()) + 1)
                     if (sent_s == i).any()]
        return {"rate": rate, "seconds": seconds, "warmup_s": warmup_s, "sent": sent, "scored": len(timed),
                "p99_ms_by_second": by_second,
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
    detectors = {d: DeviceDetector.create(names, cfg) for d in matrices}
    started = time.perf_counter()
    for d, X in matrices.items():
        for i in range(0, X.shape[0], micro_batch):
            detectors[d].process_many(X[i:i + micro_batch])
    return len(readings) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer readings, shorter latency run")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--message-batch", type=int, default=16, help="readings per telemetry message")
    parser.add_argument("--rate", type=float, default=5000.0, help="latency run: readings/s produced")
    parser.add_argument("--copies", type=int, default=3, help="throughput runs: each ASD device this many times")
    parser.add_argument("--best-message-batch", type=int, default=64, help="best run: readings per message")
    parser.add_argument("--best", default="", metavar="KEY=VALUE,...",
                        help="best run: FLEAD_* overrides, e.g. FLEAD_STREAM_MICRO_BATCH_SIZE=64")
    args = parser.parse_args()
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
        many = [Reading(f"{r.device_id}-x{c}" if c else r.device_id, r.seq, r.ts, r.metrics, r.label)
                for c in range(args.copies) for r in readings]
        thr = throughput(base_env, many, args.message_batch)
        best = throughput(base_env, many, args.best_message_batch, best_env)
        lat = latency(base_env, readings, args.rate, 10.0 if args.quick else 30.0, 10)
    finally:
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    rows = [
        {"name": "NumPy floor: DeviceDetector.process_many, 1 process", "value": round(floor), "unit": "readings/s"},
        {"name": f"stream job bounded, defaults (parallelism {cfg.stream.parallelism}), "
                 f"{args.message_batch}-reading messages", "value": round(thr["readings_per_s"]), "unit": "readings/s"},
        {"name": f"stream job bounded, best: {args.best_message_batch}-reading messages {args.best}".rstrip(),
         "value": round(best["readings_per_s"]), "unit": "readings/s"},
        {"name": f"event-to-score latency p50 at {args.rate:.0f} readings/s (score read from Kafka)",
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
    print(f"throughput run: {thr}\nbest run: {best}\nlatency run: {lat}")
    result = {"headline": {"name": "stream job readings/s end to end (Kafka → PyFlink → Kafka)",
                           "value": round(max(thr["readings_per_s"], best["readings_per_s"])), "unit": "readings/s",
                           "floor": round(floor)},
              "rows": rows, "throughput": thr, "best": {**best, "message_batch": args.best_message_batch,
                                                        "overrides": best_env}, "latency": lat,
              "settings": {k: cfg.stream[k] for k in ("parallelism", "micro_batch_size", "bundle_size",
                                                       "bundle_time_ms", "micro_batch_timeout_ms",
                                                       "buffer_timeout_ms", "sink_linger_ms")},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
