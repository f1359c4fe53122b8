"""Model quality per global version: score stored telemetry with the newest global model and each device's
newest local model, write per-device and fleet metrics to `metrics`.

    spark-submit spark_jobs/evaluate_job.py [--master spark://host:7077]

Read top to bottom (`run_evaluation`):

1. The newest global model (nothing to do before the first round) and the devices in `device_data`: at most
   `aggregation.evaluation_devices` of them, drawn at random with the version as seed (`sample_devices`), so a
   run's cost does not grow with the fleet (the scheduler's next round waits for it). Which of their documents
   hold each one's newest `aggregation.evaluation_readings` readings (one read of the documents' heads), in
   groups of bounded size (`storage.buckets.newest_buckets`), and each one's newest verified snapshot (its local
   model: `newest_verified_snapshots`, two reads).
2. Spark: the groups are spread over partitions; each partition reads a group's documents (one read per group)
   and scores its devices, each device's readings in seq order. Network weights alone are not a detector: inputs
   must be scaled as the device scales them. So each device gets a `DeviceDetector` whose feature buffer and
   running scaler learn the FIRST `aggregation.evaluation_fit_fraction` of its readings; then the evaluated weights
   are put in, its threshold (`threshold.*`, no labels) is fitted on the scores of that same first part, and the
   REST is scored (out of sample). The same scaler serves the global and the local model, so only the weights differ.
3. Driver: per device and pooled over the fleet, score mean / p50 / p99 and, where readings carry labels,
   precision / recall / F1 at that threshold, ROC-AUC and PR-AUC (`models.metrics`).
4. `metrics` documents, ``_id`` = ``<global version>:<scope>:<device_id | fleet>`` for the global model and the
   same with ``:local`` appended for the local models, so a re-run for one version overwrites, never duplicates.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402

from config import Config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.integrity import signing_key  # noqa: E402
from models.metrics import average_precision, precision_recall_f1, roc_auc  # noqa: E402
from models.serialization import SerializationError, from_b64, loads  # noqa: E402
from models.thresholds import make_threshold  # noqa: E402
from spark_jobs.partitions import collect_rows, partition_count  # noqa: E402
from spark_jobs.snapshots import newest_verified_snapshots  # noqa: E402
from storage.buckets import newest_buckets  # noqa: E402
from storage.mongo import READ_VALUES, Store  # noqa: E402

log = logging.getLogger("flead.evaluate")
MODELS = ("global", "local")


@dataclass
class EvaluationOutcome:
    """What one call of `run_evaluation` did: ``evaluated`` or ``skipped``."""

    status: str
    message: str
    version: int | None = None
    n_devices: int = 0
    n_devices_in_fleet: int = 0
    n_documents: int = 0
    problems: list[dict] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- executors

def score_device(cfg: Config, global_weights: list[np.ndarray], readings: dict,
                 local_snapshot: dict | None) -> dict:
    """Scores of one device's held-out readings under the global and its local model (see module docstring).
    `readings`: the device's stored readings as `Store.device_readings` gives them (seq order)."""
    order = np.argsort(readings["names"], kind="stable")
    metric_names = [readings["names"][i] for i in order]
    X = np.asarray(readings["values"], dtype=np.float64)[:, order]
    labels = np.asarray(readings["label"])
    ts = np.asarray(readings["ts"], dtype=np.int64)   # event times (model.features.time_of_day)
    n_fit = int(len(X) * cfg.aggregation.evaluation_fit_fraction)
    row = {"n_fit": n_fit, "labels": None, "scores": {}, "thresholds": {}, "problems": [], "local_version": None}
    if n_fit < 1 or n_fit >= len(X):
        row["problems"].append(f"{len(X)} readings: too few to fit a scaler on "
                               f"{cfg.aggregation.evaluation_fit_fraction:g} of them and score the rest")
        return row
    if (labels[n_fit:] >= 0).all():  # -1: a reading without a label
        row["labels"] = labels[n_fit:].astype(int)
    detector = DeviceDetector.create(metric_names, cfg)
    detector.learn_many(X[:n_fit], ts=ts[:n_fit])  # fits the feature buffer and scaler; the network is replaced below
    candidates = {"global": global_weights}
    if local_snapshot is not None:
        try:
            candidates["local"] = loads(from_b64(local_snapshot["weights"]))[0]
            row["local_version"] = local_snapshot["version"]
        except SerializationError as exc:
            row["problems"].append(f"local model v{local_snapshot['version']}: {exc}")
    for model, weights in candidates.items():
        try:
            detector.set_weights(weights)
        except ValueError as exc:
            row["problems"].append(f"{model} model does not fit this device's {len(metric_names)} metrics: {exc}")
            continue
        threshold = make_threshold(cfg.threshold)
        threshold.update_many(detector.score_many(X[:n_fit], ts=ts[:n_fit]))
        row["scores"][model] = detector.score_many(X[n_fit:], ts=ts[n_fit:])
        row["thresholds"][model] = float(threshold.threshold)
    return row


def score_partition(cfg_values: dict, global_b64: str, tasks):
    """Executor side: each task is a group of devices' `device_data` documents (`storage.buckets.newest_buckets`)
    and their newest verified snapshots; read the group's documents (one read) and score its devices."""
    tasks = list(tasks)
    if not tasks:
        return
    cfg = Config(cfg_values)
    global_weights = loads(from_b64(global_b64))[0]
    with Store(cfg) as store:
        for group, snapshots in tasks:
            for device_id, readings in store.readings_in(group, readings_per_device(cfg)):
                yield {"device_id": device_id, **score_device(cfg, global_weights, readings, snapshots.get(device_id))}


def readings_per_device(cfg: Config) -> int:
    """How many of a device's newest readings an evaluation reads (0: all)."""
    return max(0, cfg.aggregation.evaluation_readings)


# ---------------------------------------------------------------- driver

def quality(scores: np.ndarray, labels: np.ndarray | None, thresholds: float | np.ndarray) -> dict:
    """Score statistics and, with labels, threshold and ranking metrics (NaN, e.g. one class only, → None)."""
    doc: dict = {"n_points": int(len(scores)), "score_mean": float(np.mean(scores)),
                 "score_p50": float(np.percentile(scores, 50)), "score_p99": float(np.percentile(scores, 99))}
    if labels is not None:
        precision, recall, f1 = precision_recall_f1(labels, scores, thresholds)
        doc |= {"n_anomalies": int(labels.sum()), "precision": precision, "recall": recall, "f1": f1,
                "roc_auc": roc_auc(labels, scores), "pr_auc": average_precision(labels, scores)}
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in doc.items()}


def metric_documents(rows: list[dict], version: int, created_at: int, fleet_size: int) -> list[dict]:
    """Per-device and fleet documents for each model that scored at least one device (the fleet documents say how
    many devices were scored, ``n_devices``, of the `fleet_size` with stored telemetry)."""
    docs = []
    for model in MODELS:
        scored = [r for r in rows if model in r["scores"] and len(r["scores"][model])]
        suffix = "" if model == "global" else ":local"
        for r in scored:
            threshold = r["thresholds"][model]
            docs.append({"_id": f"{version}:device:{r['device_id']}{suffix}", "model_version": version,
                         "model": model, "scope": "device", "device_id": r["device_id"], "created_at": created_at,
                         "threshold": threshold if math.isfinite(threshold) else None,
                         "local_version": r["local_version"] if model == "local" else None,
                         **quality(r["scores"][model], r["labels"], threshold)})
        if scored:
            scores = np.concatenate([r["scores"][model] for r in scored])
            labelled = [r for r in scored if r["labels"] is not None]
            fleet = quality(scores, None, math.inf)
            if labelled:  # label metrics over the devices that have labels, each at its own threshold
                fleet |= {k: v for k, v in quality(
                    np.concatenate([r["scores"][model] for r in labelled]),
                    np.concatenate([r["labels"] for r in labelled]),
                    np.concatenate([np.full(len(r["labels"]), r["thresholds"][model]) for r in labelled]),
                ).items() if k not in fleet}
            docs.append({"_id": f"{version}:fleet:fleet{suffix}", "model_version": version, "model": model,
                         "scope": "fleet", "device_id": None, "created_at": created_at, "n_devices": len(scored),
                         "n_devices_in_fleet": fleet_size,
                         **fleet})
    return docs


def sample_devices(devices: list[str], at_most: int, version: int) -> list[str]:
    """At most `at_most` of `devices` (0 or less: all), drawn at random with `version` as seed, sorted.

    >>> sample_devices(["a", "b", "c", "d"], 2, version=7) == sample_devices(["a", "b", "c", "d"], 2, version=7)
    True
    >>> sample_devices(["a", "b"], 0, version=7)
    ['a', 'b']
    """
    if at_most <= 0 or len(devices) <= at_most:
        return sorted(devices)
    return sorted(random.Random(version).sample(sorted(devices), at_most))


def sampled(n_devices: int, fleet_size: int) -> str:
    """How the outcome names a sample (empty when every device was scored)."""
    return f" (a sample of {fleet_size:,}: aggregation.evaluation_devices)" if n_devices < fleet_size else ""


def run_evaluation(spark, cfg: Config) -> EvaluationOutcome:
    """Score a sample of the devices' newest stored telemetry (module docstring) with the newest global model and
    each device's local model; write metrics."""
    clock = time.perf_counter()
    store = Store(cfg)
    try:
        model = store.latest_global_model()
        if model is None:
            return EvaluationOutcome("skipped", "no global model yet: run an aggregation round first")
        fleet = store.device_ids()
        if not fleet:
            return EvaluationOutcome("skipped", f"no telemetry in {cfg.mongo.collections.device_data} to score",
                                     version=model["version"])
        devices = sample_devices(fleet, cfg.aggregation.evaluation_devices, model["version"])
        sc = spark.sparkContext
        # At most one group per core (`partition_count`): on the embedded server every read scans the collection
        parts = partition_count(cfg, devices, sc.defaultParallelism)
        groups = newest_buckets(store.reading_heads(devices), readings_per_device(cfg), READ_VALUES, parts)
        snapshots = newest_verified_snapshots(store, devices, signing_key(cfg))
        tasks = [(group, {d: snapshots[d] for d in group if d in snapshots}) for group in groups]
        scored = sc.parallelize(tasks, max(1, min(len(tasks), parts))).mapPartitions(
            partial(score_partition, cfg.to_dict(), model["weights"]))
        rows = collect_rows(cfg, sc, scored)  # every held-out reading's scores of the sampled devices
        docs = metric_documents(rows, model["version"], int(time.time() * 1000), len(fleet))
        store.write_metrics(docs)
        problems = [{"device_id": r["device_id"], "problem": p} for r in rows for p in r["problems"]]
        duration = time.perf_counter() - clock
        return EvaluationOutcome(
            "evaluated", f"global model v{model['version']}: {len(docs)} metric document(s) for {len(devices):,} "
                         f"device(s){sampled(len(devices), len(fleet))}, {len(problems)} problem(s), {duration:.2f} s",
            version=model["version"], n_devices=len(devices), n_devices_in_fleet=len(fleet), n_documents=len(docs),
            problems=problems, duration_s=duration)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score stored telemetry with the newest global and local models: "
                                                 "at most aggregation.evaluation_devices devices, drawn at random, "
                                                 "each on its newest aggregation.evaluation_readings readings.")
    parser.add_argument("--master", help="Spark master (default: spark-submit's --master, else "
                                         "aggregation.spark_master)")
    args = parser.parse_args(argv)
    from spark_jobs.session import run_job

    return run_job("flead-evaluate", run_evaluation, args.master)

if __name__ == "__main__":
    sys.exit(main())
