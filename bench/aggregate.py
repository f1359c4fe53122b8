"""An aggregation round end to end through `spark-submit`, beside NumPy in one process on the same snapshots.

    .venv/bin/python bench/aggregate.py [--quick] [--sizes 1000,10000] [--repeat N] [--strategies] [--json OUT]

Starts its own MongoDB (FerretDB, temporary state dir, free port) and stores N devices' snapshots of the default
detector (`model.kind`, 19 metrics: the subspace model, a float32 95×16 factor, mean and variances, ~7 KB),
signed as the stream job signs them (`models.integrity`): a few base detectors trained on synthetic data, each
device a perturbed copy of one. Rows per N (each a fresh database):

- ``numpy``: one Python process, no Spark: read the window's snapshots (one query), check each (signature, blob,
  structure, counters), choose one per device, encode (the codec), FedAvg with its checks, write the model
  (`round_documents`, in memory): the floor. Also encode, FedAvg and documents alone.
- ``numpy ... from the topic``: the same with the window read from the snapshots topic in this process (one
  consumer, `spark_jobs.topic_window.own_snapshots` with one part): the floor of the ``kafka`` source.
- ``spark-submit``: the aggregate job as cron runs it (`--master local[*]`, `aggregation.spark_submit_options`),
  once per snapshot source (`aggregation.snapshot_source`: ``mongodb``, ``kafka``, the snapshots published to a
  topic of their own as the stream job publishes them): wall time, and its parts: start-up (launcher and driver JVMs, SparkContext, Python driver), the round as the job
  times it (read: what is left of the window's read once Spark is up, the read itself as ``read_ahead``, since it
  runs during the start-up; decode on the executors, aggregate in the partitions, write), and stopping.
- ``spark warm``: `run_round` on a SparkContext that is already up (the scheduler's and the API's case).
- ``(setup) first spark-submit``: a round with no snapshots, first of the run: it writes the driver JVM's class
  archive (`aggregation.driver_class_archive`), which every later spark-submit maps, as cron's rounds after the
  first do.
- with ``--strategies``: warm rounds of the other strategies (median, trimmed mean, clustered, DP-FedAvg) at the
  largest N.

The headline is the spark-submit wall time at the largest N with the ``kafka`` source (issue 15: ≤ 10 s for
10,000 devices, start-up included); its floor the NumPy process reading the topic. The round's own publishing of
the global model is off: it adds one small message.
Numbers on a shared machine vary: `--repeat` runs each measurement that often and keeps every value.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_output import own_servers, stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import load_config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.integrity import sign_record, signing_key  # noqa: E402
from models.serialization import dumps, to_b64  # noqa: E402
from orchestration import stack  # noqa: E402
from storage.mongo import Store  # noqa: E402
from telemetry.schema import SNAPSHOT  # noqa: E402

METRICS = [f"m{i:02d}" for i in range(19)]
BASE_MODELS = 4          # distinct "kinds of device" the fleet's snapshots are perturbed copies of
TRAINING_READINGS = 600  # readings each base detector learns before its weights are taken
STRATEGIES = {"median": {}, "trimmed_mean": {}, "clustered": {},
              "dp-fedavg": {"FLEAD_PRIVACY_ENABLED": "true"}}


def base_weights(cfg) -> tuple[list[list[np.ndarray]], str]:
    """Weights of `BASE_MODELS` default detectors, each trained on its own synthetic correlated telemetry."""
    bases, architecture = [], ""
    for seed in range(BASE_MODELS):
        rng = np.random.default_rng(seed)
        mixing = rng.normal(size=(4, len(METRICS)))
        X = rng.normal(size=(TRAINING_READINGS, 4)) @ mixing + 0.3 * rng.normal(size=(TRAINING_READINGS, len(METRICS)))
        detector = DeviceDetector.create(METRICS, cfg)
        detector.learn_many(X + rng.normal(size=len(METRICS)), ts=60_000 * np.arange(TRAINING_READINGS))
        bases.append(detector.get_weights())
        architecture = detector.architecture
    return bases, architecture


def snapshots(cfg, n: int, seed: int = 0) -> list[dict]:
    """`n` devices' signed snapshots: a base detector's weights (float32, as sent) with per-device noise."""
    rng = np.random.default_rng(seed)
    bases, architecture = base_weights(cfg)
    created = int(time.time() * 1000) - 1000
    key = signing_key(cfg)
    out = []
    for i in range(n):
        base = bases[i % len(bases)]
        weights = [(w * (1 + 0.05 * rng.normal(size=w.shape))).astype(w.dtype) for w in base]
        record = SNAPSHOT.make(device_id=f"dev-{i:05d}", version=1, global_version=0,
                               n_samples=int(rng.integers(100, 600)), n_seen=600, loss=0.01,
                               weights=to_b64(dumps(weights, {"architecture": architecture, "model_version": 1})),
                               created_at=created)
        out.append(sign_record(record, key))
    return out


def numpy_round(cfg) -> tuple[float, float, int]:
    """(read + check + encode + aggregate + documents seconds, encode + aggregate + documents seconds,
    participants) in this process: the round's own functions, no Spark."""
    from spark_jobs.aggregate_job import read_window, round_documents
    from spark_jobs.snapshots import check_block, ConfiguredLayout, snapshot_limits

    start = time.perf_counter()
    key = signing_key(cfg)
    with Store(cfg) as db:
        previous, groups = read_window(db, cfg, int(time.time() * 1000))
        block = check_block(0, [d for g in groups for d in g], key, None, ConfiguredLayout(cfg),
                            snapshot_limits(cfg), keep_weights=True)
        before = time.perf_counter()
        documents = round_documents(cfg, previous, block.choices, int(time.time() * 1000), key)
        end = time.perf_counter()
    return end - start, end - before, documents.model["n_participants"]


def numpy_topic_round(cfg) -> float:
    """Seconds of a round in this process with its window read from the snapshots topic: read (one consumer),
    check, choose, encode, FedAvg, documents."""
    from spark_jobs.aggregate_job import round_documents
    from spark_jobs.snapshots import check_block, ConfiguredLayout, snapshot_limits
    from spark_jobs.topic_window import read_own_snapshots, topic_watermarks, window_ranges

    start = time.perf_counter()
    key = signing_key(cfg)
    window = window_ranges(cfg.kafka.topics.snapshots, topic_watermarks(cfg), None, first_round=True)
    docs, _ = read_own_snapshots(cfg, window, 0, 1)
    block = check_block(0, docs, key, None, ConfiguredLayout(cfg), snapshot_limits(cfg), keep_weights=True)
    round_documents(cfg, None, block.choices, int(time.time() * 1000), key)
    return time.perf_counter() - start


def publish_snapshots(cfg, snaps: list[dict]) -> None:
    """The snapshots on the snapshots topic as the stream job sends them (JSON values, lz4, no key)."""
    import orjson
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": cfg.stream.sink_linger_ms,
                         "compression.type": cfg.stream.sink_compression})
    for snap in snaps:
        producer.produce(cfg.kafka.topics.snapshots, orjson.dumps(snap))
        producer.poll(0)
    if producer.flush(60):
        raise SystemExit(f"publishing snapshots to {cfg.kafka.topics.snapshots}: not all acknowledged in 60 s")


def spark_submit_round(cfg, env: dict, expect: str = "aggregated") -> dict:
    """One spark-submit of the aggregate job: wall seconds and where they went (the job's outcome line); its
    outcome's status must be ``expect``."""
    from spark_jobs.session import submit_options, worker_environment

    launched = time.time()
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[*]",
                             *submit_options(cfg),
                             str(ROOT / "spark_jobs" / "aggregate_job.py"), "--no-publish"],
                            env={**os.environ, **env, **cfg.to_env(), **worker_environment()},
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        errors = "\n".join(line for line in result.stderr.splitlines() if " INFO " not in line)
        raise SystemExit(f"spark-submit failed ({result.returncode}):\n{errors[-3000:]}\n{result.stdout[-2000:]}")
    line = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"outcome"'))
    outcome, timeline = line["outcome"], line.get("timeline", {})
    if outcome["status"] != expect:
        raise SystemExit(f"spark-submit round: {outcome['status']}, expected {expect}: {outcome['message']}")
    parts = {"round_s": outcome["duration_s"], **{f"round_{k}": v for k, v in outcome["timings"].items()}}
    if timeline:
        parts |= {"launch_to_driver_jvm_s": timeline["jvm_started"] - launched,
                  "driver_jvm_to_python_s": timeline["python_started"] - timeline["jvm_started"],
                  "python_imports_s": timeline["imported"] - timeline["python_started"],
                  "spark_context_s": timeline["context_ready"] - timeline["imported"],
                  "stop_and_exit_s": launched + wall - timeline["job_done"]}
    return {"wall_s": wall, "startup_s": wall - outcome["duration_s"], **parts}


def fresh_database(name: str, snaps: list[dict], extra_env: dict | None = None):
    """A database holding the snapshots, read by rounds from MongoDB unless `extra_env` says otherwise; returns
    (config, env, insert seconds)."""
    env = {"FLEAD_MONGO_DATABASE": name, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "mongodb", **(extra_env or {})}
    cfg = load_config(env={**os.environ, **env})
    with Store(cfg) as db:
        db.init()
        started = time.perf_counter()
        db.write_local_models(snaps)
        insert_s = time.perf_counter() - started
    return cfg, env, insert_s


def forget_rounds(cfg) -> None:
    """Drop the round's outputs so the same snapshots make another first round."""
    with Store(cfg) as db:
        for key in ("global_models", "aggregation_history"):
            db.collection(key).delete_many({})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 devices instead of 1,000 and 10,000")
    parser.add_argument("--sizes", help="comma-separated device counts (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement (all are reported)")
    parser.add_argument("--strategies", action="store_true",
                        help="also warm rounds of median, trimmed mean, clustered and DP-FedAvg at the largest N")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [100, 1000] if args.quick else [1000, 10000]

    rows: list[dict] = []
    with own_servers("aggregate") as cfg:
        sc = None
        try:
            from spark_jobs.aggregate_job import run_round
            from spark_jobs.session import new_spark_context

            empty_cfg, empty_env, _ = fresh_database("bench_first_submit", [])
            # the first spark-submit writes the driver's class archive
            first_submit = spark_submit_round(empty_cfg, empty_env, expect="skipped")
            rows.append({"name": "(setup) first spark-submit, no snapshots: writes the driver JVM's class archive",
                         "devices": 0, "seconds": first_submit["wall_s"], "parts": first_submit})
            started = time.perf_counter()
            sc = new_spark_context(cfg, "flead-bench-aggregate", master="local[*]")
            context_start_s = time.perf_counter() - started
            for n in sizes:
                snaps = snapshots(cfg, n)
                for attempt in range(args.repeat):
                    floor_cfg, _, insert_s = fresh_database(f"bench_numpy_{n}_{attempt}", snaps)
                    numpy_s, strategy_s, participants = numpy_round(floor_cfg)
                    submit_cfg, submit_env, _ = fresh_database(f"bench_submit_{n}_{attempt}", snaps)
                    submit = spark_submit_round(submit_cfg, submit_env)
                    topic_env = {"FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "kafka",
                                 "FLEAD_KAFKA_TOPICS_SNAPSHOTS": f"bench.snapshots.{n}.{attempt}"}
                    topic_cfg, topic_env, _ = fresh_database(f"bench_topic_{n}_{attempt}", snaps, topic_env)
                    stack.ensure_topics(topic_cfg)
                    publish_snapshots(topic_cfg, snaps)
                    numpy_topic_s = numpy_topic_round(topic_cfg)
                    topic_submit = spark_submit_round(topic_cfg, topic_env)
                    warm_cfg, _, _ = fresh_database(f"bench_warm_{n}_{attempt}", snaps)
                    warm = run_round(sc, warm_cfg, publish_model=False)
                    assert warm.status == "aggregated" and warm.n_participants == participants, warm.message
                    rows += [
                        {"name": f"numpy one process: read, check, encode, fedavg, documents; {n} devices",
                         "devices": n, "seconds": numpy_s, "attempt": attempt},
                        {"name": f"numpy encode, fedavg, documents alone; {n} devices", "devices": n,
                         "seconds": strategy_s, "attempt": attempt},
                        {"name": "numpy one process, from the topic: read, check, encode, fedavg, documents; "
                                 f"{n} devices", "devices": n, "seconds": numpy_topic_s, "attempt": attempt},
                        {"name": f"spark-submit end to end, from MongoDB; {n} devices", "devices": n,
                         "seconds": submit["wall_s"], "parts": submit, "attempt": attempt},
                        {"name": f"spark-submit end to end, from the topic; {n} devices", "devices": n,
                         "seconds": topic_submit["wall_s"], "parts": topic_submit, "attempt": attempt},
                        {"name": f"spark warm run_round; {n} devices", "devices": n, "seconds": warm.duration_s,
                         "parts": warm.timings, "attempt": attempt},
                        {"name": f"(setup) storing {n} snapshots", "devices": n, "seconds": insert_s,
                         "attempt": attempt},
                    ]
            if args.strategies:
                n = sizes[-1]
                for name, env in STRATEGIES.items():
                    strategy_cfg, _, _ = fresh_database(f"bench_{name.replace('-', '_')}_{n}", snaps,
                                                        {"FLEAD_AGGREGATION_STRATEGY": name.removeprefix("dp-"), **env})
                    for attempt in range(args.repeat):
                        outcome = run_round(sc, strategy_cfg, publish_model=False)
                        assert outcome.status == "aggregated", outcome.message
                        rows.append({"name": f"spark warm run_round, {name}; {n} devices", "devices": n,
                                     "seconds": outcome.duration_s, "parts": outcome.timings, "attempt": attempt})
                        forget_rounds(strategy_cfg)
        finally:
            if sc is not None:
                sc.stop()

    print(f"snapshots: default detector ({cfg.model.kind}), {len(METRICS)} metrics, signed; warm SparkContext "
          f"start-up {context_start_s:.1f} s; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(f"{'row':70s} {'seconds':>8s}")
    for row in rows:
        parts = "  " + ", ".join(f"{k} {v:.2f}" for k, v in row["parts"].items()) if "parts" in row else ""
        print(f"{row['name']:70s} {row['seconds']:8.2f}{parts}")
    largest = sizes[-1]
    end_to_end = [r["seconds"] for r in rows
                  if r["name"] == f"spark-submit end to end, from the topic; {largest} devices"]
    floor = [r["seconds"] for r in rows if r["name"] == ("numpy one process, from the topic: read, check, encode, "
                                                         f"fedavg, documents; {largest} devices")]
    headline = {"name": f"aggregation round through spark-submit, start-up included, snapshots from the topic, "
                        f"{largest} devices (median of {len(end_to_end)})", "value": float(np.median(end_to_end)),
                "unit": "s",
                "floor": float(np.median(floor))}
    result = {"headline": headline, "rows": rows, "spark_context_start_s": context_start_s, "quick": args.quick,
              "load_average": os.getloadavg(), "python": platform.python_version(), "numpy": np.__version__,
              "cores": os.cpu_count()}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
