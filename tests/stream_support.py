"""Helpers of the tests that run the stream job (tests/integration, tests/chaos): a bounded run as a child
process, topics read back, raw messages sent, ASD slices, and global models signed as the aggregator signs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from confluent_kafka import Producer

from config import PROJECT_ROOT, load_config
from models.integrity import AGGREGATOR_ISSUER, sign_record, signing_key
from models.serialization import dumps, to_b64
from telemetry.consumer import iter_messages
from telemetry.readers import open_reader
from telemetry.schema import Reading, decode_scores

JOB = PROJECT_ROOT / "flink_jobs" / "anomaly_job.py"
JOB_TIMEOUT_S = 300


def asd_slice(cfg, split: str, devices: int, per_device: int, rename: str = "") -> list[Reading]:
    """The first `per_device` readings of the first `devices` devices of ASD `split` (ids prefixed by `rename`)."""
    out, counts = [], {}
    for r in open_reader("asd", cfg.data_dir / f"asd/{split}.csv.gz"):
        if r.device_id not in counts and len(counts) == devices:
            break
        counts[r.device_id] = counts.get(r.device_id, 0) + 1
        if counts[r.device_id] <= per_device:
            out.append(Reading(rename + r.device_id, r.seq, r.ts, r.metrics, r.label))
    return out


def run_bounded(tmp_path: Path, *args: str, env: dict | None = None) -> None:
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, str(JOB), "--bounded", *args], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]


def records(key: str, value: bytes) -> list[dict]:
    """The records of one message of the topic `key` (a scores message is a batch of score records)."""
    return decode_scores(value) if key == "scores" else [json.loads(value)]


def read_topic(cfg, key: str, timeout_s: float = 3.0) -> list[dict]:
    return [record for m in iter_messages(cfg.kafka_bootstrap, cfg.kafka.topics[key], from_beginning=True,
                                          timeout_s=timeout_s) for record in records(key, m.value())]


def send_raw(cfg, topic_key: str, values: list[bytes], key: bytes = b"bad") -> None:
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap})
    for value in values:
        producer.produce(cfg.kafka.topics[topic_key], value, key=key)
    assert producer.flush(10) == 0


def global_model_message(weights, version: int, cluster=None, members=None, key: bytes | None = None) -> bytes:
    """A global model as the aggregator publishes it: signed with the deployment's key (or `key`), building on the
    version before it."""
    record = {"schema": "flead.global-model/1", "version": version, "round_id": f"r{version}",
              "strategy": "fedavg", "participants": [], "rejected": [], "n_samples": 1000,
              "weights": to_b64(dumps(weights, {"model_version": version})), "created_at": 0,
              "dp_epsilon": None, "cluster": cluster, "members": members,
              "previous_version": version - 1, "issuer": AGGREGATOR_ISSUER}
    return json.dumps(sign_record(record, key or signing_key(load_config()))).encode()


