"""The global model server (FastAPI): read the models and rounds, trigger a round, accept devices' snapshots.

    python -m spark_jobs.api          # or `flead api start`; uvicorn on api.host:api.port, OpenAPI at /docs

Reads are open. Writes (``POST``) need ``Authorization: Bearer <token>``:

- the admin token (`api.token`, or when that is empty a token generated on first start into
  ``<state_dir>/api_token``, mode 0600) starts rounds and issues device tokens (``POST /api/device-tokens/{id}``);
- a device token (HMAC of the device id under the deployment's signing key) sends that device's snapshots, and
  only that device's: ``POST /api/local-update`` checks a snapshot as the aggregation round does
  (`spark_jobs.snapshots`: structure against the global model or the configured architecture, counters that
  follow the device's previous snapshot whose signature verifies, norm and direction against the global model),
  then stores it signed.

Refusals: 401 without a token (before the body is read), 403 with a wrong one, 413 for a body over
`api.max_body_bytes` (before it is read), 400/409/422 with the reason for a bad payload, 503 when MongoDB cannot be
reached.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from pymongo.errors import PyMongoError

from config import Config, load_config
from models.aggregation import snapshot_problem
from models.integrity import device_token, sign_record, signing_key, wire_form
from models.serialization import from_b64, loads
from spark_jobs.api_monitoring import monitoring_routes
from spark_jobs.snapshots import (ConfiguredLayout, check_snapshot, global_model_problem, newest_verified_snapshot,
                                  previous_update, snapshot_limits)
from spark_jobs.topic_window import publish_snapshot
from storage.mongo import StorageError, Store
from telemetry.schema import GLOBAL_MODEL_SCHEMA, SNAPSHOT

MAX_INT = 2**53  # JSON numbers above this lose precision in most clients
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$"  # no ":" (it separates the parts of document ids)
MAX_WEIGHTS_CHARS = 16_000_000
MODEL_FIELDS = {"rejected": [], "dp_epsilon": None, "cluster": None}  # may be absent in stored documents
HISTORY_FIELDS = ("round_id", "version", "strategy", "n_participants", "n_rejected", "rejected", "n_samples",
                  "mean_loss", "started_at", "finished_at", "duration_s", "timings", "norms", "dp_epsilon",
                  "dp_round_epsilon", "dp_delta", "dp_sampling_rate", "dp_noise_multiplier", "dp_rounds",
                  "cluster_sizes", "published")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read (Content-Length), or as
    soon as the bytes received pass the limit (chunked bodies); a write without ``Authorization`` gets 401
    before its body is read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send, 413, f"request body over api.max_body_bytes ({self.limit} bytes)")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and b"authorization" not in headers:
            return await self._refuse(send, 401, "writes need 'Authorization: Bearer <token>' (api.token or "
                                                 "<state_dir>/api_token; a device token for /api/local-update)")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # an HTTPException, so FastAPI's body parsing passes it on as 413
                    raise HTTPException(413, f"request body over api.max_body_bytes ({self.limit} bytes)")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as exc:  # raised by limited_receive outside FastAPI's handlers
            if exc.status_code != 413 or started:
                raise
            await self._refuse(send, 413, exc.detail)

    @staticmethod
    async def _refuse(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def api_token(cfg: Config) -> str:
    """`api.token`, else the token in ``<state_dir>/api_token``, created (0600) on first use."""
    if cfg.api.token:
        return cfg.api.token
    path = Path(cfg.state_dir) / "api_token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return path.read_text().strip()
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        return token


class LocalUpdate(BaseModel):
    """A `flead.snapshot/1` weight snapshot from a device outside the stream job."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["flead.snapshot/1"] | None = Field(None, alias="schema")
    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    version: int = Field(ge=0, le=MAX_INT)
    global_version: int = Field(0, ge=0, le=MAX_INT)
    n_samples: int = Field(ge=1, le=MAX_INT, description="readings learned since the previous snapshot")
    n_seen: int = Field(ge=1, le=MAX_INT, description="readings seen in all (at least n_samples)")
    loss: float | None = Field(None, allow_inf_nan=False)
    weights: str = Field(min_length=1, max_length=MAX_WEIGHTS_CHARS, description="base64 models.serialization blob")
    created_at: int | None = Field(None, ge=0, le=MAX_INT,
                                   description="ignored: the server stores the time of receipt")


class Runs:
    """Aggregation rounds triggered through the API: one at a time, in a background thread."""

    def __init__(self, run_round: Callable[[], dict]):
        self._run_round = run_round
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flead-aggregate")
        self._lock = threading.Lock()
        self.runs: dict[str, dict] = {}
        self.running: str | None = None

    def start(self) -> str | None:
        """Start a round and return its id, or None when one is running already."""
        with self._lock:
            if self.running:
                return None
            run_id = uuid.uuid4().hex[:12]
            self.running = run_id
            self.runs[run_id] = {"run_id": run_id, "status": "running", "started_at": int(time.time() * 1000)}
        self._pool.submit(self._run, run_id)
        return run_id

    def _run(self, run_id: str) -> None:
        run = self.runs[run_id]
        try:
            run["outcome"] = self._run_round()
            run["status"] = "finished"
        except Exception as exc:  # reported through GET /api/runs/{id}
            run["status"], run["error"] = "failed", f"{exc.__class__.__name__}: {exc}"
        run["finished_at"] = int(time.time() * 1000)
        with self._lock:
            self.running = None


def spark_round_runner(cfg: Config) -> Callable[[], dict]:
    """A round on a SparkSession created on first use and then kept warm in this process."""
    session: dict[str, Any] = {}

    def run() -> dict:
        from spark_jobs.aggregate_job import run_round
        from spark_jobs.session import spark_session

        if "spark" not in session:
            session["spark"] = spark_session(cfg, "flead-api-aggregate")
        return run_round(session["spark"], cfg).to_dict()
    return run


def model_view(doc: dict) -> dict:
    """A stored global model as the `flead.global-model/1` message it was published as: a signed one exactly as
    signed (clients verify it), an unsigned one with defaults for fields older documents lack."""
    wire = wire_form(doc, GLOBAL_MODEL_SCHEMA)
    return wire if "signature" in wire else {**MODEL_FIELDS, **wire}


def create_app(cfg: Config | None = None, run_round: Callable[[], dict] | None = None) -> FastAPI:
    """The API on the configured MongoDB; `run_round` runs one aggregation round (default: warm Spark)."""
    cfg = cfg or load_config()
    token = api_token(cfg)
    key = signing_key(cfg)
    layout = ConfiguredLayout(cfg)
    runs = Runs(run_round or spark_round_runner(cfg))
    database: dict[str, Any] = {}
    bearer = HTTPBearer(auto_error=False, description="api.token or <state_dir>/api_token")

    def db():
        if "db" not in database:
            database["db"] = Store(cfg)
        return database["db"]

    def presented(credentials: HTTPAuthorizationCredentials | None) -> str:
        if credentials is None:
            raise HTTPException(401, "writes need 'Authorization: Bearer <token>' (api.token or "
                                     "<state_dir>/api_token)", headers={"WWW-Authenticate": "Bearer"})
        return credentials.credentials

    def writer(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not secrets.compare_digest(presented(credentials).encode(), token.encode()):
            raise HTTPException(403, "wrong API token")

    app = FastAPI(title="FLEAD global model server", version="1",
                  description="Federated global models, aggregation rounds and device snapshots.")
    app.add_middleware(BodyLimit, limit=cfg.api.max_body_bytes)

    app.include_router(monitoring_routes(cfg, db, writer))  # /metrics, /healthz, incidents, feedback, suppressions

    @app.exception_handler(StorageError)
    @app.exception_handler(PyMongoError)
    async def storage_unavailable(request, exc):
        return JSONResponse({"detail": f"MongoDB: {exc}"}, status_code=503)

    @app.get("/api/global-model", summary="The newest global model, or one version")
    def get_global_model(version: int | None = Query(None, ge=1, le=MAX_INT)) -> dict:
        doc = db().latest_global_model() if version is None else db().global_model(version)
        if doc is None:
            raise HTTPException(404, "no global model yet" if version is None else f"no global model v{version}")
        return model_view(doc)

    @app.get("/api/status", summary="Newest model, newest round, aggregation in progress")
    def get_status() -> dict:
        model = db().latest_global_model()
        rounds = db().aggregation_rounds(limit=1)
        return {"latest_version": model["version"] if model else None,
                "latest_created_at": model["created_at"] if model else None,
                "strategy": cfg.aggregation.strategy, "schedule_minutes": cfg.aggregation.schedule_minutes,
                "differential_privacy": cfg.privacy.enabled, "secure_aggregation": cfg.privacy.secure_aggregation,
                "dp_epsilon": model.get("dp_epsilon") if model else None,
                "dp_delta": (model.get("dp") or {}).get("delta") if model else None,
                "last_round": {k: rounds[0].get(k) for k in HISTORY_FIELDS} if rounds else None,
                "running": runs.running}

    @app.get("/api/history", summary="Aggregation rounds, newest first")
    def get_history(limit: int = Query(20, ge=1, le=500)) -> list[dict]:
        return [{k: r.get(k) for k in HISTORY_FIELDS} for r in db().aggregation_rounds(limit)]

    @app.post("/api/aggregate", status_code=202, dependencies=[Depends(writer)],
              summary="Start an aggregation round now; poll GET /api/runs/{run_id}")
    def post_aggregate() -> dict:
        run_id = runs.start()
        if run_id is None:
            raise HTTPException(409, f"aggregation run {runs.running} is in progress")
        return {"run_id": run_id, "status": "running"}

    @app.get("/api/runs/{run_id}", summary="A triggered aggregation run")
    def get_run(run_id: str) -> dict:
        if run_id not in runs.runs:
            raise HTTPException(404, f"no run {run_id!r} in this server's lifetime")
        return runs.runs[run_id]

    @app.post("/api/device-tokens/{device_id}", status_code=201, dependencies=[Depends(writer)],
              summary="The token with which one device sends its own snapshots")
    def post_device_token(device_id: str = PathParam(pattern=DEVICE_ID_PATTERN)) -> dict:
        return {"device_id": device_id, "token": device_token(key, device_id)}

    @app.post("/api/local-update", status_code=201,
              summary="Store a device's weight snapshot after the checks of an aggregation round")
    def post_local_update(update: LocalUpdate,
                          credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        if not secrets.compare_digest(presented(credentials).encode(), device_token(key, update.device_id).encode()):
            raise HTTPException(403, f"not the device token of {update.device_id!r}: a device may only send its own "
                                     "snapshots (POST /api/device-tokens/{device_id} with the admin token)")
        current = db().latest_global_model()
        current_weights = loads(from_b64(current["weights"]))[0] if current else None
        record = sign_record(SNAPSHOT.make(**update.model_dump(exclude={"schema_", "created_at"}),
                                           created_at=int(time.time() * 1000)), key)
        stored = {k: v for k, v in record.items() if k != "schema"}
        candidate = check_snapshot(stored, key, [w.shape for w in current_weights] if current_weights else None,
                                   layout)
        where = f" (current global model v{current['version']})" if current else ""
        if candidate.problem:
            raise HTTPException(400, f"{candidate.problem}{where}")
        previous = previous_update(newest_verified_snapshot(db(), update.device_id, key))
        snapshot_id = f"{update.device_id}:{update.version}"
        if previous is not None and update.version <= previous.version:
            raise HTTPException(409, f"snapshot {snapshot_id}: the device's newest stored snapshot is "
                                     f"v{previous.version}; send a higher version")
        problem = (snapshot_problem(candidate.update, previous, snapshot_limits(cfg))
                   or global_model_problem(candidate.update.weights, current_weights, cfg))
        if problem:
            raise HTTPException(400, f"{problem}{where}")
        if cfg.aggregation.snapshot_source == "kafka":  # rounds read the topic: send it there first (the sink
            try:                                        # stores it too; the first write of its _id wins)
                publish_snapshot(cfg, record)
            except Exception as exc:
                raise HTTPException(503, f"snapshot {snapshot_id} not stored: the snapshots topic did not take it "
                                         f"({exc}); send it again") from None
        if not db().write_local_models([record]):
            raise HTTPException(409, f"snapshot {snapshot_id} exists already; send a higher version")
        return {"id": snapshot_id, "stored": True}

    return app


def main() -> int:
    import uvicorn

    cfg = load_config()
    uvicorn.run(create_app(cfg), host=cfg.api.host, port=cfg.api.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
