"""The evaluation job (spark_jobs/evaluate_job.py) on a fleet's stored telemetry, bounded and not, beside its scoring.

    .venv/bin/python bench/evaluate.py [--quick] [--json OUT]

Starts its own MongoDB and Kafka (temporary state dir, free ports) and one local[2] SparkContext. Stores N devices'
readings (19 correlated metrics, 2 % of them anomalous and labelled) as the sink stores them (bucket documents of
500 readings) and one signed snapshot per device, runs one aggregation round, then warm `run_evaluation`:

- ``defaults``: `aggregation.evaluation_devices` and `aggregation.evaluation_readings` as configured (200 devices
  of the fleet, drawn at random; each on its newest 20,000 readings);
- ``every device, every reading``: both 0 (what the job did before 5 December 2026).

The headline is the ``defaults`` run; its floor the scoring alone: `score_device` in this process on the same
devices' readings, read beforehand (no database, no Spark). On the embedded FerretDB the difference is mostly its
reads: every read but a single `_id` scans the whole collection.
"""
from __future__ import annotations

import argparse
import os
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
from models.serialization import from_b64, loads, to_b64  # noqa: E402
from storage.buckets import reading_bucket  # noqa: E402
from storage.mongo import Store  # noqa: E402
from telemetry.schema import SNAPSHOT  # noqa: E402

METRICS = [f"m{i:02d}" for i in range(19)]
LATENT = 5                # the metrics are noisy mixes of this many signals
DOCUMENT_READINGS = 500   # readings per stored bucket document
SNAPSHOT_READINGS = 600   # readings each device's detector learns before its snapshot
ANOMALY_RATE = 0.02


def store_fleet(cfg, devices: int, readings: int, seed: int = 0) -> None:
    """`devices` devices' labelled readings in `device_data` and a signed snapshot each in `local_models`."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(LATENT, len(METRICS)))
    key, now = signing_key(cfg), int(time.time() * 1000)
    with Store(cfg) as db:
        db.init()
        snapshots = []
        for d in range(devices):
            device_id = f"d{d:05d}"
            X = rng.normal(size=(readings, LATENT)) @ mixing + 0.1 * rng.normal(size=(readings, len(METRICS)))
            labels = (rng.random(readings) < ANOMALY_RATE).astype(np.int8)
            X[labels == 1] += 3.0
            seq = np.arange(readings)
            parts = [slice(s, s + DOCUMENT_READINGS) for s in range(0, readings, DOCUMENT_READINGS)]
            ts = 1_700_000_000_000 + 1000 * seq
            db.collection("device_data").insert_many([
                reading_bucket(device_id, seq[p], ts[p], labels[p], METRICS, X[p], 1, now) for p in parts])
            detector = DeviceDetector.create(METRICS, cfg)
            detector.learn_many(X[:SNAPSHOT_READINGS], ts=ts[:SNAPSHOT_READINGS])
            snap = detector.snapshot()
            snapshots.append(sign_record(SNAPSHOT.make(
                device_id=device_id, version=snap["version"], global_version=snap["global_version"],
                n_samples=snap["n_samples"], n_seen=detector.n_seen, loss=None, weights=to_b64(snap["weights"]),
                created_at=now - 1000), key))
        db.write_local_models(snapshots)


def scoring_alone(cfg, devices: list[str]) -> float:
    """Seconds `score_device` takes for these devices' readings (as the job reads them), read beforehand."""
    from spark_jobs.evaluate_job import score_device

    with Store(cfg) as db:
        readings = db.device_readings(devices)
        model = db.latest_global_model()
        newest = cfg.aggregation.evaluation_readings
        weights = loads(from_b64(model["weights"]))[0]
    started = time.perf_counter()
    for device_id in devices:
        r = readings[device_id]
        kept = slice(-newest if newest else 0, None)
        score_device(cfg, weights, {**r, "values": r["values"][kept], "label": r["label"][kept]}, None)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 devices x 2,000 readings instead of 400 x 4,000")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    devices, readings = (60, 2000) if args.quick else (400, 4000)
    runs = {"defaults": {}, "every device, every reading": {"FLEAD_AGGREGATION_EVALUATION_DEVICES": "0",
                                                            "FLEAD_AGGREGATION_EVALUATION_READINGS": "0"}}
    rows: list[dict] = []
    with own_servers("evaluate") as cfg:
        from spark_jobs.aggregate_job import run_round
        from spark_jobs.evaluate_job import run_evaluation
        from spark_jobs.session import spark_session

        cfg = load_config(env={**os.environ, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "mongodb"})  # stored there
        made = time.perf_counter()
        store_fleet(cfg, devices, readings)
        print(f"stored {devices} devices x {readings:,} readings in {time.perf_counter() - made:.1f} s", flush=True)
        spark = spark_session(cfg, "flead-bench-evaluate", master="local[2]")
        try:
            assert run_round(spark, cfg, publish_model=False).status == "aggregated"
            print(f"{'run':<30} {'seconds':>8} {'devices':>8} {'scored':>10}", flush=True)
            for name, env in runs.items():
                run_cfg = load_config(env={**os.environ, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "mongodb", **env})
                outcome = run_evaluation(spark, run_cfg)
                assert outcome.status == "evaluated", outcome.message
                with Store(run_cfg) as db:
                    fleet = db.find("metrics", {"_id": f"{outcome.version}:fleet:fleet"})[0]
                    scored = sorted(d["device_id"] for d in db.find("metrics", {"scope": "device", "model": "global"}))
                rows.append({"name": name, "seconds": outcome.duration_s, "devices": outcome.n_devices,
                             "devices_in_fleet": outcome.n_devices_in_fleet, "points": fleet["n_points"],
                             "roc_auc": fleet.get("roc_auc"), "message": outcome.message})
                print(f"{name:<30} {outcome.duration_s:>8.2f} {outcome.n_devices:>8,} {fleet['n_points']:>10,}",
                      flush=True)
                if name == "defaults":
                    floor_s = scoring_alone(run_cfg, scored)
        finally:
            spark.stop()
    print(f"{'scoring alone (floor)':<30} {floor_s:>8.2f}")
    headline = rows[0]
    write_json(args.json, {"headline": {"name": f"evaluation of a fleet of {devices} devices x {readings:,} readings, "
                                                f"the defaults ({headline['devices']} devices), warm, local[2]",
                                        "value": headline["seconds"], "unit": "s", "floor": floor_s},
                           "rows": rows + [{"name": "scoring alone (floor)", "seconds": floor_s}]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
