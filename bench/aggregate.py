"""Aggregation wall time on Spark beside NumPy FedAvg in one process, on the same snapshots, in the same run.

    .venv/bin/python bench/aggregate.py [--quick] [--json OUT]

Starts its own MongoDB (FerretDB, temporary state dir, free port) and stores N devices' snapshots of the default
detector (19 metrics, dense autoencoder 16-4-16, 791 weights) twice, in two databases. Rows per N:

- ``numpy``: one Python process: read the newest snapshot per device (pymongo), decode, FedAvg (`make_strategy`);
  also the FedAvg call alone.
- ``spark warm``: `run_round` on a SparkSession that is already up (the scheduler's and the API's case):
  decode in executors, aggregate in the driver, write the global model and the round.
- ``spark-submit``: the aggregate job as cron would run it; its start-up (JVM, SparkContext, Python workers)
  is the wall time minus the round time the job reports, shown separately.

The headline is the warm Spark round at the largest N; its floor is the NumPy process on the same snapshots.
Publishing to Kafka is off (no broker is started); it adds one small message per round.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_output import write_json  # noqa: E402  (beside this script)
from config import load_config  # noqa: E402
from models.aggregation import Update, make_strategy  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.integrity import sign_record, signing_key  # noqa: E402
from models.serialization import dumps, from_b64, loads, to_b64  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from storage.mongo import Store  # noqa: E402

METRICS = [f"m{i:02d}" for i in range(19)]


def snapshots(cfg, n: int, seed: int = 0) -> list[dict]:
    """`n` devices' snapshots: the default detector's weights plus a little per-device noise."""
    rng = np.random.default_rng(seed)
    base = DeviceDetector.create(METRICS, cfg).get_weights()
    created = int(time.time() * 1000) - 1000
    key = signing_key(cfg)
    return [sign_record({"schema": "flead.snapshot/1", "device_id": f"dev-{i:05d}", "version": 1, "global_version": 0,
                         "n_samples": int(rng.integers(100, 600)), "n_seen": 600, "loss": 0.01, "created_at": created,
                         "weights": to_b64(dumps([w + 0.01 * rng.normal(size=w.shape) for w in base],
                                                 {"architecture": "dense_ae", "model_version": 1}))}, key)
            for i in range(n)]


def numpy_round(cfg) -> tuple[float, float]:
    """(read + decode + FedAvg seconds, FedAvg alone seconds) in this process."""
    start = time.perf_counter()
    db = Store(cfg)
    docs = db.latest_local_models()
    updates = [Update(d["device_id"], loads(from_b64(d["weights"]))[0], d["n_samples"]) for d in docs]
    before = time.perf_counter()
    make_strategy(cfg).aggregate(updates)
    end = time.perf_counter()
    db.close()
    return end - start, end - before


def spark_submit_round(cfg, env: dict) -> tuple[float, float]:
    """(wall seconds, round seconds reported by the job) of one spark-submit of the aggregate job."""
    from spark_jobs.session import worker_environment

    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[*]",
                             "--conf", "spark.ui.enabled=false", str(ROOT / "spark_jobs" / "aggregate_job.py"),
                             "--no-publish"],
                            env={**os.environ, **env, **cfg.to_env(), **worker_environment()},
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"spark-submit failed:\n{result.stderr[-3000:]}")
    outcome = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"outcome"'))["outcome"]
    if outcome["status"] != "aggregated":
        raise SystemExit(f"spark-submit round did not aggregate: {outcome['message']}")
    return wall, outcome["duration_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 devices instead of 1,000 and 10,000")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [100, 1000] if args.quick else [1000, 10000]

    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-aggregate-"))
    base_env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_MONGO_PORT": str(processes.free_port()),
                "FLEAD_MONGO_URI": "", "SPARK_LOCAL_IP": "127.0.0.1"}
    os.environ.update(base_env)
    cfg = load_config()
    rows: list[dict] = []
    spark = None
    try:
        stack.start_mongo(cfg)
        from spark_jobs.aggregate_job import run_round
        from spark_jobs.session import spark_session

        started = time.perf_counter()
        spark = spark_session(cfg, "flead-bench-aggregate", master="local[*]")
        session_start_s = time.perf_counter() - started
        for n in sizes:
            snaps = snapshots(cfg, n)
            per_db = {}
            for mode in ("warm", "submit"):
                db_env = {"FLEAD_MONGO_DATABASE": f"bench_{mode}_{n}"}
                per_db[mode] = (load_config(env={**os.environ, **db_env}), db_env)
                db = Store(per_db[mode][0])
                db.init()
                t = time.perf_counter()
                db.write_local_models(snaps)
                insert_s = time.perf_counter() - t
                db.close()
            numpy_s, fedavg_s = numpy_round(per_db["warm"][0])
            spark_round = run_round(spark, per_db["warm"][0], publish_model=False)
            assert spark_round.status == "aggregated", spark_round.message
            submit_wall, submit_round = spark_submit_round(*per_db["submit"])
            rows += [
                {"name": f"numpy one process, read+decode+fedavg, {n} devices", "devices": n, "seconds": numpy_s},
                {"name": f"numpy fedavg call alone, {n} devices", "devices": n, "seconds": fedavg_s},
                {"name": f"spark warm run_round, {n} devices", "devices": n, "seconds": spark_round.duration_s,
                 "timings": spark_round.timings},
                {"name": f"spark-submit wall, {n} devices", "devices": n, "seconds": submit_wall},
                {"name": f"spark-submit start-up (wall - round), {n} devices", "devices": n,
                 "seconds": submit_wall - submit_round},
                {"name": f"spark-submit round inside the job, {n} devices", "devices": n, "seconds": submit_round},
                {"name": f"(setup) storing {n} snapshots in MongoDB", "devices": n, "seconds": insert_s},
            ]
    finally:
        if spark is not None:
            spark.stop()
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    print(f"snapshots: default detector, {len(METRICS)} metrics; warm SparkSession start-up {session_start_s:.1f} s; "
          f"{os.cpu_count()} cores")
    print(f"{'row':58s} {'seconds':>9s}")
    for row in rows:
        extra = "  " + ", ".join(f"{k} {v:.2f}" for k, v in row["timings"].items()) if "timings" in row else ""
        print(f"{row['name']:58s} {row['seconds']:9.2f}{extra}")
    largest = sizes[-1]
    by_name = {row["name"]: row["seconds"] for row in rows}
    headline = {"name": f"warm Spark aggregation round (decode, FedAvg, write), {largest} devices",
                "value": by_name[f"spark warm run_round, {largest} devices"], "unit": "s",
                "floor": by_name[f"numpy one process, read+decode+fedavg, {largest} devices"]}
    result = {"headline": headline, "rows": rows, "spark_session_start_s": session_start_s, "quick": args.quick,
              "python": platform.python_version(), "numpy": np.__version__, "cores": os.cpu_count()}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
