"""Issue 17's "done when": a secure-aggregation round end to end, with nothing simulated.

The real stream job (PyFlink, live) runs with `privacy.secure_aggregation` on; four devices stream ASD readings and
enrol (their X25519 public keys, no weights); the real aggregation job (spark-submit) announces the cohort; three
devices answer with masked updates and one (enrolled, then silent) drops out; the aggregation job asks the
survivors for their pair seeds with it, unmasks only the survivors' sum and publishes a signed global model; every
device in the stream adopts it. The real sink stores the snapshots in MongoDB on the way.

What the server side holds is checked too: every stored snapshot and every message on the snapshot topic is an
enrolment, a masked vector (bytes indistinguishable from uniform) or a survivor's seeds with the dropped device
only; removing every revealed mask from a survivor's vector still leaves uniform words.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy.stats import chisquare

from config import PROJECT_ROOT, load_config
from models.integrity import signing_key, verify_record, wire_form
from models.secure_aggregation import (ENROLMENT, MASKED, NO_WEIGHTS, SEED_REVEAL, _signed_mask,
                                       cohort_from_record, decode_words)
from models.serialization import from_b64, loads
from services import processes
from spark_jobs.session import worker_environment
from storage.sink import MongoSink
from stream_support import JOB, asd_slice, read_topic
from telemetry.producer import produce, producer_config

pytestmark = [pytest.mark.integration, pytest.mark.flink, pytest.mark.spark]

SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")
DEVICES = 4                 # ASD devices streaming; the last one enrols and then goes silent (the dropout)
SNAPSHOT_EVERY = 100        # readings between a device's snapshots (enrolment, masked answer, seed reveal)
CHUNK = 120                 # readings per device sent while waiting for the next protocol step
STEP_TIMEOUT_S = 240        # a step (the job starting, snapshots arriving) must be done by then


def uniform(words: np.ndarray) -> bool:
    """Whether the bytes of `words` pass a chi-square test for uniformity (a plain float vector fails it)."""
    return chisquare(np.bincount(words.view(np.uint8), minlength=256)).pvalue > 1e-4


class Fleet:
    """The devices' readings, handed out in order (seq keeps increasing), and the real sink storing snapshots."""

    def __init__(self, cfg, env: dict):
        readings = asd_slice(cfg, "test", DEVICES, 3000)
        self.ids = sorted({r.device_id for r in readings})
        self.queues = {d: [r for r in readings if r.device_id == d] for d in self.ids}
        self.cfg, self.env = cfg, env
        self.sink = f"test-secure-sink-{time.monotonic_ns()}"
        self.sent = 0

    def send(self, devices, n: int) -> None:
        batch = []
        for d in devices:
            batch, self.queues[d] = batch + self.queues[d][:n], self.queues[d][n:]
        assert batch, "the ASD slice ran out of readings"
        assert produce(batch, self.cfg.kafka.topics.telemetry, producer_config(self.cfg), key=signing_key(self.cfg),
                       batch=16).failed == 0
        self.sent += len(batch)

    def caught_up(self) -> list[dict]:
        """The score records so far, if the job has scored every reading sent (else an empty list)."""
        scores = read_topic(self.cfg, "scores", timeout_s=1.0)
        return scores if len(scores) >= self.sent else []

    def store_snapshots(self, db) -> None:
        """Run the real sink over the snapshot topic until MongoDB holds every snapshot sent so far."""
        sent = {(r["device_id"], r["version"]) for r in read_topic(self.cfg, "snapshots", timeout_s=1.0)}
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while db.collection("local_models").count_documents({}) < len(sent):
            assert time.monotonic() < deadline, "the sink did not store every snapshot; it refused: " + \
                str([d.get("reason") for d in db.collection("dead_letters").find({})])
            MongoSink(self.cfg, group_id=self.sink, topics=("snapshots",)).run(until_idle_s=3.0)

    def wait_for(self, db, devices, what: str, encoding: str, state_dir) -> dict[str, dict]:
        """Keep `devices` streaming until each has sent a snapshot of `encoding`; once the sink has stored every
        snapshot, the newest of that encoding per device."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            sent = read_topic(self.cfg, "snapshots", timeout_s=1.0)
            if set(devices) <= {r["device_id"] for r in sent if r["encoding"] == encoding}:
                break
            assert processes.running_pid(state_dir, "stream") is not None, processes.log_tail(state_dir, "stream", 60)
            seen = sorted((r["device_id"], r["version"], r["encoding"]) for r in sent)
            assert time.monotonic() < deadline, f"no {what} from some of {devices} within {STEP_TIMEOUT_S} s; " \
                f"snapshots sent: {seen}; dead letters: {read_topic(self.cfg, 'dead_letters', timeout_s=1.0)}"
            if self.caught_up():  # more readings only once the job has scored what it was sent
                self.send(devices, CHUNK)
            time.sleep(2.0)
        self.store_snapshots(db)
        return {d["device_id"]: d for d in db.collection("local_models").find({"encoding": encoding})}


def aggregate(env: dict) -> dict:
    """One run of the aggregation job through spark-submit; its outcome."""
    started = time.monotonic()
    result = subprocess.run([SPARK_SUBMIT, "--master", "local[2]", "--conf", "spark.ui.enabled=false",
                             str(PROJECT_ROOT / "spark_jobs" / "aggregate_job.py")],
                            env={**env, **worker_environment()}, capture_output=True, text=True, timeout=300,
                            cwd=PROJECT_ROOT)
    error = result.stderr[result.stderr.find("Traceback"):] if "Traceback" in result.stderr else result.stderr
    assert result.returncode == 0, f"spark-submit exited {result.returncode}: {result.stdout[-1500:]}\n{error[-3000:]}"
    outcome = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"outcome"'))["outcome"]
    print(f"spark-submit: {outcome['status']} in {time.monotonic() - started:.1f} s: {outcome['message']}")
    return outcome


def test_stream_devices_complete_a_secure_round_through_spark_and_adopt_the_global_model(cfg, db, tmp_path):
    key = signing_key(cfg)
    env = {**os.environ, "FLEAD_STATE_DIR": str(tmp_path), "FLEAD_INTEGRITY_KEY": key.hex(),
           "FLEAD_PRIVACY_SECURE_AGGREGATION": "true", "FLEAD_PRIVACY_SECURE_ROUND_TIMEOUT_S": "0",
           "FLEAD_STREAM_SNAPSHOT_EVERY": str(SNAPSHOT_EVERY)}
    secure = load_config(env=env)
    fleet = Fleet(cfg, env)
    survivors, dropout = fleet.ids[:-1], fleet.ids[-1]
    started = time.monotonic()
    processes.start(tmp_path, "stream", [sys.executable, str(JOB)], env=env)
    try:
        # 1. every device enrols: snapshots announce its public key and layout, never its weights
        fleet.send(fleet.ids, 2 * SNAPSHOT_EVERY + 50)
        fleet.wait_for(db, fleet.ids, "enrolment", ENROLMENT, tmp_path)
        announced = aggregate(env)
        assert announced["status"] == "skipped" and "cohort of 4 device(s) announced" in announced["message"]

        # 2. the survivors answer with masked updates; the dropout sends nothing more
        answers = fleet.wait_for(db, survivors, "masked answer", MASKED, tmp_path)
        recovering = aggregate(env)
        assert recovering["status"] == "skipped" and "1 member(s) dropped out" in recovering["message"]

        # 3. the survivors reveal their pair seeds with the dropout; the job unmasks the survivors' sum
        reveals = fleet.wait_for(db, survivors, "seed reveal", SEED_REVEAL, tmp_path)
        outcome = aggregate(env)
        assert outcome["status"] == "aggregated" and outcome["version"] == 1, outcome
        assert outcome["n_participants"] == len(survivors) and outcome["published"]

        # 4. every device in the stream adopts global model v1
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            scores = fleet.caught_up()
            adopted = {s["device_id"] for s in scores if s["global_version"] == 1}
            if adopted == set(fleet.ids):
                break
            assert time.monotonic() < deadline, f"devices that adopted v1: {sorted(adopted)}"
            if scores or fleet.sent == 0:
                fleet.send(fleet.ids, 20)
            time.sleep(2.0)
        fleet.store_snapshots(db)
    finally:
        processes.stop(tmp_path, "stream", grace=5)
    print(f"secure round through the stream job and spark-submit: {time.monotonic() - started:.1f} s")

    # the model: signed by the aggregator, FedAvg of the survivors' capped weights (the unmasked weight column)
    model = db.latest_global_model()
    assert model["strategy"] == "secure-fedavg" and model["n_participants"] == 3
    assert verify_record(wire_form(model, "flead.global-model/1"), key) is None
    cap = secure.privacy.secure_max_weight
    assert model["n_samples"] == sum(min(answers[d]["n_samples"], cap) for d in survivors)
    weights, _ = loads(from_b64(model["weights"]))
    assert all(np.isfinite(w).all() and np.abs(w).max() < 1e6 for w in weights)  # masks that did not cancel: ~1e11
    for device in fleet.ids:   # each device's score records move to v1 and never back
        versions = [s["global_version"] for s in sorted(scores, key=lambda s: s["seq"]) if s["device_id"] == device]
        assert versions == sorted(versions) and versions[-1] == 1, device

    # what the server side holds: enrolments, masked words, seeds with the dropout only; nothing else per device
    cohort = cohort_from_record(db.collection("aggregation_history").find_one({"protocol_for": 1})["cohort"])
    assert set(cohort.members) == set(fleet.ids)
    stored = list(db.collection("local_models").find({}))
    kafka = read_topic(cfg, "snapshots")
    assert len(stored) == len({(k["device_id"], k["version"]) for k in kafka}) >= 4 + 3 + 3
    for doc in stored + kafka:
        assert doc["encoding"] in (ENROLMENT, MASKED, SEED_REVEAL), doc["encoding"]
        if doc["encoding"] == MASKED:
            assert uniform(decode_words(doc["weights"], cohort.length)), doc["device_id"]
        else:
            assert doc["weights"] == NO_WEIGHTS
        if doc["encoding"] == SEED_REVEAL:
            assert [entry["device_id"] for entry in doc["revealed_seeds"]] == [dropout]
    assert not any(d["device_id"] == dropout and d["encoding"] != ENROLMENT for d in stored)
    for device in survivors:   # every revealed seed applied, a survivor's vector is still masked
        words = decode_words(answers[device]["weights"], cohort.length)
        [entry] = reveals[device]["revealed_seeds"]
        seed = bytes.fromhex(entry["seed"])
        assert uniform(words - _signed_mask(device, dropout, seed, cohort.length)), device
    history = db.aggregation_rounds()
    finished = [h for h in history if h.get("version") == 1 and "protocol_for" not in h]
    assert finished and finished[0].get("norms") is None and not finished[0].get("update_norms")  # none to see
    refused = [d for d in read_topic(cfg, "dead_letters") if d["source"] == cfg.kafka.topics.global_model]
    assert refused == []  # the cohort announcements and the model were all accepted
