"""Documents shaped as in docs/contracts.md, for the dashboards to show: a few hours of a small fleet.

They are written through `storage.mongo`, the functions the pipeline itself uses, so the dashboards are tested
on exactly the documents the stream and the aggregation jobs produce.
"""
from __future__ import annotations

import random

from config import Config
from storage import mongo

DEVICES = [f"dev-{i:02d}" for i in range(1, 7)]
READING_INTERVAL_MS = 60_000
HOURS = 4
METRICS = [f"m{i:02d}" for i in range(8)]
DEAD_LETTER_REASONS = ["missing field 'ts'", "not JSON: Expecting value", "metrics.m03: expected a number, got str"]
ROUNDS = 6


def _top_metrics(rng: random.Random) -> list[dict]:
    names = rng.sample(METRICS, 3)
    shares = sorted((rng.random() for _ in names), reverse=True)
    total = sum(shares) * 1.3
    return [{"metric": name, "share": round(share / total, 3)} for name, share in zip(names, shares)]


WARMUP = 20  # readings per device without a threshold


def write_sample_documents(db, cfg: Config, now_ms: int, seed: int = 3) -> None:
    """Create the collections of ``db`` and write sample documents ending at ``now_ms`` into them."""
    rng = random.Random(seed)
    start = now_ms - HOURS * 3_600_000
    predictions = []
    for d, device in enumerate(DEVICES):
        anomaly_rate = 0.03 + 0.02 * d  # later devices misbehave more, so the rankings are clear
        for seq, ts in enumerate(range(start, now_ms, READING_INTERVAL_MS)):
            is_anomaly = seq > WARMUP and rng.random() < anomaly_rate
            threshold = 0.6 + 0.05 * rng.random()
            score = threshold * (1.2 + rng.random()) if is_anomaly else threshold * rng.random() * 0.9
            predictions.append({"device_id": device, "seq": seq, "ts": ts, "score": round(score, 4),
                                # no threshold while the device warms up, as the stream job emits it
                                "threshold": round(threshold, 4) if seq >= WARMUP else None, "is_anomaly": is_anomaly,
                                "top_metrics": _top_metrics(rng), "model_version": 1 + seq // 60,
                                "global_version": min(ROUNDS, seq // 40), "label": int(is_anomaly),
                                "scored_at": ts + 350})
    global_models, history, metrics = [], [], []
    for version in range(1, ROUNDS + 1):
        at = start + version * 1_800_000
        rejected = [{"device_id": DEVICES[-1], "reason": "update norm above 10x the cohort median"}] \
            if version % 3 == 0 else []
        participants = [d for d in DEVICES if d not in {r["device_id"] for r in rejected}]
        global_models.append({"schema": "flead.global-model/1", "version": version,
                              "round_id": f"r{version}", "strategy": "fedavg", "participants": participants,
                              "rejected": rejected, "n_samples": 500 * len(participants), "weights": "AAAA",
                              "created_at": at, "dp_epsilon": None, "cluster": None})
        history.append({"round_id": f"r{version}", "version": version, "strategy": "fedavg",
                        "n_participants": len(participants), "n_rejected": len(rejected),
                        "participants": participants, "rejected": rejected,
                        "mean_loss": round(0.08 / version + 0.01 * rng.random(), 4),
                        "started_at": at - 4000, "finished_at": at, "duration_s": 4.0})
        f1 = 0.55 + 0.05 * version
        metrics.append({"_id": f"fleet:{version}", "model_version": version, "scope": "fleet", "device_id": None,
                        "f1": round(f1, 3), "roc_auc": round(0.75 + 0.03 * version, 3),
                        "pr_auc": round(f1 - 0.05, 3), "precision": round(f1 + 0.03, 3),
                        "recall": round(f1 - 0.03, 3), "n_points": 5000, "created_at": at + 1000})
        for device in DEVICES[:2]:
            metrics.append({"_id": f"{device}:{version}", "model_version": version, "scope": "device",
                            "device_id": device, "f1": round(f1 - 0.02, 3), "roc_auc": round(0.74 + 0.03 * version, 3),
                            "pr_auc": round(f1 - 0.07, 3), "precision": round(f1, 3), "recall": round(f1 - 0.04, 3),
                            "n_points": 800, "created_at": at + 1000})
    dead_letters = [{"schema": "flead.dead-letter/1", "source": "flead.telemetry",
                     "reason": DEAD_LETTER_REASONS[i % len(DEAD_LETTER_REASONS)], "raw": f"{{\"seq\": {i}",
                     "device_id": DEVICES[i % 3] if i % 2 else None, "at": start + i * 517_000}
                    for i in range(27)]
    mongo.init_db(db, cfg)
    mongo.write_predictions(db, cfg, predictions)
    for model in global_models:
        mongo.write_global_model(db, cfg, model)
    for round_doc in history:
        mongo.write_aggregation_round(db, cfg, round_doc)
    mongo.write_metrics(db, cfg, metrics)
    mongo.write_dead_letters(db, cfg, dead_letters)
