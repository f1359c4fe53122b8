"""Documents shaped as in docs/contracts.md, for the dashboards to show: a few days of a small fleet, with a gap.

They are written through `storage.mongo.Store`, as the pipeline writes them (bucketed readings and scores, their
roll-ups, incidents, drift events, dead letters, rounds), so the dashboards are tested on the documents the stream
job, the sink and the aggregation job produce.
"""
from __future__ import annotations

import math
import random

from config import Config
from storage.mongo import Store
from telemetry.schema import Reading

DEVICES = [f"dev-{i:02d}" for i in range(1, 7)]
READING_INTERVAL_MS = 300_000
HOUR_MS = 3_600_000
# Two stretches of readings with a gap between them, like a training and a test replay.
STRETCHES_H = ((72, 48), (30, 0))  # (hours before now it starts, hours before now it ends)
METRICS = [f"m{i:02d}" for i in range(8)]
DEAD_LETTER_REASONS = ["missing field 'ts'", "not JSON: Expecting value", "metrics.m03: expected a number, got str"]
ROUNDS = 6
WARMUP = 20  # readings per device without a threshold


def _top_metrics(rng: random.Random) -> list[dict]:
    names = rng.sample(METRICS, 3)
    shares = sorted((rng.random() for _ in names), reverse=True)
    total = sum(shares) * 1.3
    return [{"metric": name, "share": round(share / total, 3)} for name, share in zip(names, shares)]


def _timestamps(now_ms: int) -> list[int]:
    out = []
    for start_h, end_h in STRETCHES_H:
        start = (now_ms - start_h * HOUR_MS) // READING_INTERVAL_MS * READING_INTERVAL_MS
        out += list(range(start, now_ms - end_h * HOUR_MS, READING_INTERVAL_MS))
    return out


def _incidents(device: str, scores: list[dict], rng: random.Random) -> list[dict]:
    """Runs of flagged readings (gaps of at most 3) as incidents; the last one still open."""
    flagged = [r for r in scores if r["is_anomaly"]]
    runs: list[list[dict]] = []
    for r in flagged:
        if runs and r["seq"] - runs[-1][-1]["seq"] <= 3:
            runs[-1].append(r)
        else:
            runs.append([r])
    out = []
    for i, run in enumerate(runs):
        first, last = run[0], run[-1]
        peak = max(run, key=lambda r: r["score"])
        out.append({"schema": "flead.incident/1", "incident_id": f"{device}:{first['seq']}", "device_id": device,
                    "status": "open" if i == len(runs) - 1 else "resolved", "start_seq": first["seq"],
                    "end_seq": last["seq"], "start_ts": first["ts"], "end_ts": last["ts"] + READING_INTERVAL_MS,
                    "n_flagged": len(run), "n_readings": last["seq"] - first["seq"] + 1,
                    "peak_score": peak["score"], "peak_ratio": round(peak["score"] / peak["threshold"], 3),
                    "metrics_to_blame": _top_metrics(rng), "model_version": 1 + first["seq"] // 60,
                    "global_version": min(ROUNDS, first["seq"] // 40), "updated_at": last["scored_at"]})
    return out


def write_sample_documents(store: Store, cfg: Config, now_ms: int, seed: int = 3) -> None:
    """Create the collections of the store's database and write sample documents ending at ``now_ms``."""
    rng = random.Random(seed)
    stamps = _timestamps(now_ms)
    start = stamps[0]
    scores, readings, incidents, drift = [], [], [], []
    for d, device in enumerate(DEVICES):
        burst_rate = 0.004 + 0.003 * d  # later devices misbehave more, so the rankings are clear
        device_scores, burst = [], 0
        for seq, ts in enumerate(stamps):
            if not burst and seq > WARMUP and rng.random() < burst_rate:
                burst = rng.randint(2, 8)  # anomalies come in runs: incidents
            is_anomaly, burst = burst > 0, max(0, burst - 1)
            threshold = 0.6 + 0.05 * math.sin(seq / 50)
            score = threshold * (1.2 + rng.random()) if is_anomaly else threshold * rng.random() * 0.9
            metrics = {m: round(math.sin(seq / (10 + j)) + 0.1 * rng.random() + (2.0 if is_anomaly and j == 3 else 0),
                                4) for j, m in enumerate(METRICS)}
            readings.append(Reading(device, seq, ts, metrics, label=int(is_anomaly)))
            device_scores.append({
                "device_id": device, "seq": seq, "ts": ts, "score": round(score, 6),
                # no threshold while the device warms up, as the stream job emits it
                "threshold": round(threshold, 6) if seq >= WARMUP else None, "is_anomaly": is_anomaly,
                "top_metrics": _top_metrics(rng), "model_version": 1 + seq // 60,
                "global_version": min(ROUNDS, seq // 40), "label": int(is_anomaly), "scored_at": ts + 350,
                "p_value": round(max(1e-4, 1 - score / 2), 4) if seq >= WARMUP else None, "incident_id": None})
        for incident in _incidents(device, device_scores, rng):
            incidents.append(incident)
            for r in device_scores:
                if r["is_anomaly"] and incident["start_seq"] <= r["seq"] <= incident["end_seq"]:
                    r["incident_id"] = incident["incident_id"]
        scores += device_scores
        seq = len(stamps) // 2 + 7 * d
        drift.append({"schema": "flead.drift/1", "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
                      "ts": stamps[seq], "reason": "flag rate above target for the window", "flag_rate": 0.08 + d / 100,
                      "target_rate": 0.01, "window": 200, "detected_at": stamps[seq] + 400, "model_version": 3})
    global_models, history, metrics = [], [], []
    for version in range(1, ROUNDS + 1):
        at = start + version * 7 * HOUR_MS
        rejected = [{"device_id": DEVICES[-1], "reason": "update norm 14.2x the cohort median (limit 10x)"}] \
            if version % 3 == 0 else []
        if version == 5:
            rejected.append({"device_id": DEVICES[0], "reason": "cosine -0.41 to the median update (limit 0)"})
        participants = [d for d in DEVICES if d not in {r["device_id"] for r in rejected}]
        epsilon = round(0.8 * version, 2) if version >= 4 else None  # DP switched on from round 4
        global_models.append({"schema": "flead.global-model/1", "version": version,
                              "round_id": f"r{version}", "strategy": "fedavg", "participants": participants,
                              "rejected": rejected, "n_samples": 500 * len(participants), "weights": "AAAA",
                              "created_at": at, "dp_epsilon": epsilon, "cluster": None})
        history.append({"round_id": f"r{version}", "version": version, "strategy": "fedavg",
                        "n_participants": len(participants), "n_rejected": len(rejected),
                        "participants": participants, "rejected": rejected,
                        "mean_loss": round(0.08 / version + 0.01 * rng.random(), 4), "dp_epsilon": epsilon,
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
                     "device_id": DEVICES[i % 3] if i % 2 else None, "at": start + i * 2_917_000}
                    for i in range(27)]
    store.init()
    store.write_readings(readings)
    store.write_scores(scores)
    store.write_incidents(incidents)
    store.write_drift_events(drift)
    for model in global_models:
        store.write_global_model(model)
    for round_doc in history:
        store.write_aggregation_round(round_doc)
    store.write_metrics(metrics)
    store.write_dead_letters(dead_letters)
