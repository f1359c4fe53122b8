"""The global model server against the session's MongoDB: auth, validation, reads, and a bounded fuzz run."""
from __future__ import annotations

import json
import os
import stat
import time

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from config import load_config
from fakes import crafted_blob
from models.detector import DeviceDetector
from models.integrity import device_token, sign_record, signing_key, verify_record, wire_form
from models.serialization import dumps, from_b64, to_b64
from services import processes
from spark_jobs.api import api_token, create_app
from storage.mongo import Store

pytestmark = pytest.mark.integration

SHAPES = [w.shape for w in DeviceDetector.create(["cpu", "mem", "disk", "net"], load_config()).get_weights()]
TOKEN = "test-token-123"


def blob(shapes=SHAPES, value=0.5) -> str:
    return to_b64(dumps([np.full(s, value) for s in shapes], {"architecture": "dense_ae"}))


def snapshot(device_id="dev-1", version=1, **fields) -> dict:
    """A REST snapshot with the architecture of the configured model at 3 metrics (SHAPES)."""
    return {"schema": "flead.snapshot/1", "device_id": device_id, "version": version, "n_samples": 100,
            "n_seen": 100, "loss": 0.02, "weights": blob()} | fields


@pytest.fixture
def api_cfg(cfg):
    return load_config(env={**os.environ, "FLEAD_API_TOKEN": TOKEN})


def stub_round() -> dict:
    return {"status": "skipped", "message": "stub round"}


@pytest.fixture
def client(api_cfg):
    with TestClient(create_app(api_cfg, run_round=stub_round)) as test_client:
        yield test_client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def device_auth(cfg, device_id="dev-1") -> dict:
    return {"Authorization": f"Bearer {device_token(signing_key(cfg), device_id)}"}


def store_global_model(db, cfg, value=0.5, shapes=SHAPES, version=1):
    model = sign_record({"schema": "flead.global-model/1", "version": version, "previous_version": version - 1,
                         "issuer": "flead-aggregator", "round_id": f"r{version}", "strategy": "fedavg",
                         "participants": ["dev-1"], "weights": blob(shapes, value), "created_at": version},
                        signing_key(cfg))
    db.write_global_model(model)
    return model


def test_writes_without_or_with_a_wrong_token_are_refused(client, api_cfg, db):
    assert client.post("/api/local-update", json=snapshot()).status_code == 401
    assert client.post("/api/aggregate").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/api/local-update", json=snapshot(), headers=wrong).status_code == 403
    assert client.post("/api/aggregate", headers=wrong).status_code == 403
    assert db.collection("local_models").count_documents({}) == 0


def test_valid_update_is_stored_and_bad_ones_get_the_reason(client, api_cfg, db):
    AUTH = device_auth(api_cfg)  # noqa: N806 (the device's own token from here on)
    ok = client.post("/api/local-update", json=snapshot(), headers=AUTH)
    assert ok.status_code == 201 and ok.json() == {"id": "dev-1:1", "stored": True}
    stored = db.latest_local_model("dev-1")
    assert stored["n_samples"] == 100 and stored["created_at"] > 0
    assert verify_record(wire_form(stored, "flead.snapshot/1"), signing_key(api_cfg)) is None  # stored signed
    assert client.post("/api/local-update", json=snapshot(), headers=AUTH).status_code == 409

    store_global_model(db, api_cfg)
    cases = {
        "not base64": (snapshot(version=2, weights="***"), 400, "not base64"),
        "not a blob": (snapshot(version=2, weights="aGVsbG8gd29ybGQgaGVsbG8="), 400, "magic"),
        "wrong shape": (snapshot(version=2, weights=blob([(5, 16)] + SHAPES[1:])), 400, "wrong shape"),
        "non-finite": (snapshot(version=2, weights=blob(value=np.nan)), 400, "non-finite"),
        "a header crafted with its digest": (
            snapshot(version=2, weights=to_b64(crafted_blob(from_b64(blob()), meta=["x"]))), 400,
            "corrupt header"),
        "zero samples": (snapshot(version=2, n_samples=0), 422, "n_samples"),
        "bad device id": (snapshot(device_id="a:b"), 422, "device_id"),
        "unknown field": (snapshot(version=2, colour="red"), 422, "colour"),
        "missing weights": ({k: v for k, v in snapshot(version=2).items() if k != "weights"}, 422, "weights"),
    }
    for name, (body, status, reason) in cases.items():
        response = client.post("/api/local-update", json=body, headers=AUTH)
        assert response.status_code == status, (name, response.text)
        assert reason in response.text, (name, response.text)
    assert client.post("/api/local-update", content=b"{not json", headers=AUTH).status_code == 422


def test_issue_14_probes_of_local_update_are_refused(client, api_cfg, db):
    """Each REST probe of issue 14.1 (all answered 201 before)."""
    own = device_auth(api_cfg)
    other_model = blob([(4, 8), (8,), (8, 4), (4,)])   # a smaller autoencoder than the configured one
    response = client.post("/api/local-update", json=snapshot(weights=other_model), headers=own)
    assert response.status_code == 400 and any(  # while no global model exists: refused for its structure
        reason in response.text for reason in ("wrong number of layers", "no layout of the configured model"))
    assert client.post("/api/local-update", json=snapshot(), headers=own).status_code == 201
    store_global_model(db, api_cfg)
    cases = {
        "10^6 x norm": (snapshot(version=2, n_seen=200, weights=blob(value=0.5e6)), own, 400, "norm"),
        "sign flip": (snapshot(version=2, n_seen=200, weights=blob(value=-0.5)), own, 400, "cosine"),
        "n_samples 2^53": (snapshot(version=2, n_seen=2 ** 53, n_samples=2 ** 53), own, 400, "exceeds the"),
        "n_seen jump": (snapshot(version=2, n_seen=2 ** 40, n_samples=100), own, 400, "readings/s"),
        "version 10^6": (snapshot(version=10 ** 6, n_seen=300), own, 400, "new reading"),
        "another device's id": (snapshot(device_id="dev-2", version=2), own, 403, "dev-2"),
        "the admin token": (snapshot(version=2, n_seen=200), AUTH, 403, "device token"),
    }
    for name, (body, headers, status, reason) in cases.items():
        response = client.post("/api/local-update", json=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        assert reason in response.text, (name, response.text)
    assert client.post("/api/local-update", json=snapshot(version=2, n_seen=200), headers=own).status_code == 201
    assert db.latest_local_model("dev-2") is None


def test_a_forged_newer_snapshot_in_the_store_does_not_block_the_device(client, api_cfg, db):
    """A document written straight into local_models with a high version but no valid signature is not the
    device's previous snapshot: its next genuine one is still accepted (it was 409 "send a higher version")."""
    own = device_auth(api_cfg)
    assert client.post("/api/local-update", json=snapshot(), headers=own).status_code == 201
    forged = sign_record(snapshot(version=10 ** 6, n_seen=10 ** 6, created_at=1), bytes(32))
    assert db.write_local_models([forged]) == 1
    response = client.post("/api/local-update", json=snapshot(version=2, n_seen=200), headers=own)
    assert response.status_code == 201, response.text


def test_device_tokens_come_from_the_admin(client, api_cfg):
    issued = client.post("/api/device-tokens/dev-9", headers=AUTH)
    assert issued.status_code == 201 and issued.json()["token"] == device_token(signing_key(api_cfg), "dev-9")
    assert client.post("/api/device-tokens/dev-9", headers=device_auth(api_cfg, "dev-9")).status_code == 403
    body = snapshot(device_id="dev-9")
    assert client.post("/api/local-update", json=body,
                       headers={"Authorization": f"Bearer {issued.json()['token']}"}).status_code == 201


def test_large_bodies_are_refused_before_they_are_read(api_cfg):
    small = load_config(env={**os.environ, "FLEAD_API_TOKEN": TOKEN, "FLEAD_API_MAX_BODY_BYTES": "10000"})
    app = create_app(small, run_round=stub_round)
    with TestClient(app) as client:
        declared = client.post("/api/local-update", content=b"x" * 20_000,
                               headers={**AUTH, "Content-Type": "application/json"})
        assert declared.status_code == 413 and "api.max_body_bytes" in declared.text

        def chunks():
            for _ in range(50):
                yield b"y" * 1000
        streamed = client.post("/api/local-update", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
        assert streamed.status_code == 413
        unauthenticated = client.post("/api/local-update", content=b"{}", headers={"Content-Type": "application/json"})
        assert unauthenticated.status_code == 401


def test_body_limit_answers_before_reading(api_cfg):
    """A 200 MB unauthenticated body (issue 14.7) is answered without being read: the ASGI app never receives it."""
    import asyncio

    from spark_jobs.api import BodyLimit

    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"z" * 1_000_000, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive_, send_):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "method": "POST", "path": "/api/local-update",
             "headers": [(b"content-length", b"200000000")]}
    asyncio.run(BodyLimit(app, 20_000_000)(scope, receive, send))
    assert sent[0]["status"] == 413 and received == []
    asyncio.run(BodyLimit(app, 20_000_000)({**scope, "headers": []}, receive, send))
    assert sent[2]["status"] == 401 and received == []


def test_reads_and_triggered_run(client, api_cfg, db):
    assert client.get("/api/global-model").status_code == 404
    stored = store_global_model(db, api_cfg)
    db.write_aggregation_round({"round_id": "r1", "version": 1, "strategy": "fedavg",
                                                "started_at": 1, "n_participants": 1, "n_rejected": 0})
    model = client.get("/api/global-model").json()
    assert model["schema"] == "flead.global-model/1" and model["version"] == 1 and model == stored
    assert verify_record(model, signing_key(api_cfg)) is None   # clients can check what they download
    assert client.get("/api/global-model", params={"version": 1}).json()["round_id"] == "r1"
    assert client.get("/api/global-model", params={"version": 2}).status_code == 404
    assert client.get("/api/status").json()["latest_version"] == 1
    assert [r["round_id"] for r in client.get("/api/history").json()] == ["r1"]

    run = client.post("/api/aggregate", headers=AUTH)
    assert run.status_code == 202
    run_id = run.json()["run_id"]
    deadline = time.monotonic() + 10
    while client.get(f"/api/runs/{run_id}").json()["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get(f"/api/runs/{run_id}").json()["outcome"] == stub_round()
    assert client.get("/docs").status_code == 200


def test_generated_token_file_is_private(cfg):
    token = api_token(cfg)
    path = cfg.state_dir / "api_token"
    assert len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert api_token(cfg) == token


def test_fuzzed_requests_never_get_a_server_error(api_cfg, db):
    store_global_model(db, api_cfg)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(api_cfg, run_round=stub_round))
    fuzzed, statuses = [], set()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            headers = AUTH
            if isinstance(case.body, dict) and isinstance(case.body.get("device_id"), str):
                headers = device_auth(api_cfg, case.body["device_id"])   # reach the checks behind the token
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
            statuses.add((operation.label, response.status_code))

        fuzz()
        fuzzed.append(operation.label)
    assert ("POST /api/local-update", 400) in statuses  # bodies reached the checks behind the schema
    assert "POST /api/local-update" in fuzzed and len(fuzzed) == 7 + 9  # + the operator routes (api_monitoring)


def test_flead_api_start_serves_and_stop_stops(cfg):
    from orchestration.cli import main

    env_cfg = load_config(env={**os.environ, "FLEAD_API_PORT": str(processes.free_port())})
    os.environ["FLEAD_API_PORT"] = str(env_cfg.api.port)
    try:
        assert main(["api", "start"]) == 0
        response = httpx.get(f"http://{env_cfg.api.host}:{env_cfg.api.port}/api/status", timeout=10)
        assert response.status_code == 200 and response.json()["latest_version"] is None
    finally:
        assert main(["api", "stop"]) == 0
        os.environ.pop("FLEAD_API_PORT")
    assert processes.running_pid(cfg.state_dir, "api") is None


def test_under_the_kafka_snapshot_source_a_posted_snapshot_also_goes_to_the_topic(cfg, db):
    """Rounds that read the snapshots topic (`aggregation.snapshot_source: kafka`) see REST snapshots too: the API
    sends each one there, signed and keyed by its device, as well as storing it."""
    from confluent_kafka import Consumer

    topic_cfg = load_config(env={**os.environ, "FLEAD_API_TOKEN": TOKEN, "FLEAD_AGGREGATION_SNAPSHOT_SOURCE": "kafka"})
    with TestClient(create_app(topic_cfg, run_round=stub_round)) as client:
        posted = client.post("/api/local-update", json=snapshot(), headers=device_auth(topic_cfg))
    assert posted.status_code == 201, posted.text
    consumer = Consumer({"bootstrap.servers": topic_cfg.kafka_bootstrap, "group.id": "test-api-topic",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic_cfg.kafka.topics.snapshots])
    messages = []
    for _ in range(30):
        messages += [m for m in consumer.consume(10, timeout=1.0) if m.error() is None]
        if messages:
            break
    consumer.close()
    assert [m.key() for m in messages] == [b"dev-1"]
    sent = json.loads(messages[0].value())
    assert verify_record(sent, signing_key(topic_cfg)) is None and sent["version"] == 1
    assert db.latest_local_model("dev-1")["signature"] == sent["signature"]
