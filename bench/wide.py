"""Aggregation rounds of wide devices (many metrics each) beside a round of ASD-shaped ones, on Spark.

    .venv/bin/python bench/wide.py [--quick] [--json OUT]

Starts its own MongoDB and Kafka (temporary state dir, free ports) and one local[2] SparkContext with Spark's
default driver memory. For each fleet (N devices × M metrics) it stores N signed snapshots of default detectors
(`model.*`) that learned 600 synthetic readings of M correlated metrics, as the stream job signs them, then runs
one warm `run_round` (FedAvg with its checks: the median, cosines, the sample cap) on a database of its own. A
subspace model of d = M × `model.subspace.window` inputs aggregates as a vector of d + d(d+1)/2 entries: 4,655
for 19 metrics, 501,500 for 200, 12.5 million for 1,000 (above `aggregation.max_vector_entries`: the round refuses
those snapshots with the reason, the expected outcome). Each row gives the round's status, seconds and timings.

The headline is the round of 110 devices × 200 metrics (12 with ``--quick``): before 5 December 2026 it failed
with `OutOfMemoryError: Java heap space` (the median's histograms). Its floor: the same number of 19-metric devices
in the same run.
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
from models.serialization import to_b64  # noqa: E402
from storage.mongo import Store  # noqa: E402
from telemetry.schema import SNAPSHOT  # noqa: E402

LEARNED_READINGS = 600   # readings each device's detector learns before its snapshot
LATENT = 8               # synthetic metrics are noisy mixes of this many signals
HEADLINE_METRICS = 200


def snapshots(cfg, devices: int, metrics: int, seed: int = 0) -> list[dict]:
    """`devices` signed snapshots of default detectors of `metrics` metrics, each after `LEARNED_READINGS` readings
    of its own synthetic telemetry (one mixing matrix for the fleet, noise per device)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(LATENT, metrics))
    key, now, out = signing_key(cfg), int(time.time() * 1000), []
    for i in range(devices):
        detector = DeviceDetector.create([f"m{j:04d}" for j in range(metrics)], cfg)
        X = rng.normal(size=(LEARNED_READINGS, LATENT)) @ mixing + 0.1 * rng.normal(size=(LEARNED_READINGS, metrics))
        ts = now - 60_000 * np.arange(LEARNED_READINGS, 0, -1)   # a reading a minute, up to now
        for start in range(0, LEARNED_READINGS, 64):
            detector.process_many(X[start:start + 64], ts=ts[start:start + 64])
        snap = detector.snapshot()
        record = SNAPSHOT.make(device_id=f"wide-{i:04d}", version=snap["version"],
                               global_version=snap["global_version"], n_samples=snap["n_samples"],
                               n_seen=detector.n_seen, loss=None, weights=to_b64(snap["weights"]),
                               created_at=now - 1000)
        out.append(sign_record(record, key))
    return out


def fleet_round(sc, devices: int, metrics: int) -> dict:
    """One warm round over a fresh database holding the fleet's snapshots."""
    from spark_jobs.aggregate_job import run_round

    cfg = load_config(env={**os.environ, "FLEAD_MONGO_DATABASE": f"bench_wide_{devices}_{metrics}",
                           "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "mongodb"})  # the snapshots are stored there
    made = time.perf_counter()
    snaps = snapshots(cfg, devices, metrics)
    with Store(cfg) as db:
        db.init()
        db.write_local_models(snaps)
    stored_s = time.perf_counter() - made
    outcome = run_round(sc, cfg, publish_model=False)
    return {"name": f"{devices} devices × {metrics} metrics", "devices": devices, "metrics": metrics,
            "status": outcome.status, "seconds": outcome.duration_s, "timings": outcome.timings,
            "message": outcome.message[:400], "setup_s": stored_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 devices per fleet instead of 110")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    stop_cleanly_on_sigterm()
    devices = 12 if args.quick else 110
    fleets = [(devices, 19), (devices, HEADLINE_METRICS), (12, 400), (devices, 1000)]

    rows: list[dict] = []
    with own_servers("wide") as cfg:
        from spark_jobs.session import new_spark_context

        sc = new_spark_context(cfg, "flead-bench-wide", master="local[2]")
        try:
            print(f"{'fleet':<28} {'status':<11} {'seconds':>8}  timings", flush=True)
            for n, m in fleets:
                row = fleet_round(sc, n, m)
                rows.append(row)
                timings = ", ".join(f"{k} {v:.2f}" for k, v in row["timings"].items())
                print(f"{row['name']:<28} {row['status']:<11} {row['seconds']:>8.2f}  "
                      f"{timings or row['message'][:90]}", flush=True)
        finally:
            sc.stop()
    headline, floor = (next(r for r in rows if r["devices"] == devices and r["metrics"] == m)
                       for m in (HEADLINE_METRICS, 19))
    write_json(args.json, {"headline": {"name": f"aggregation round, {headline['name']} (warm, local[2])",
                                        "value": headline["seconds"], "unit": "s", "floor": floor["seconds"],
                                        "status": headline["status"]},
                           "rows": rows})
    return 0 if headline["status"] == "aggregated" else 1


if __name__ == "__main__":
    raise SystemExit(main())
