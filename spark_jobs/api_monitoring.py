"""The API's operator routes: Prometheus `/metrics`, `/healthz`, incidents, feedback and suppression rules.

Included by `spark_jobs.api.create_app` (``app.include_router(monitoring_routes(...))``); reads are open, writes
need the API token like every other write. docs/monitoring.md describes each route.

- ``GET /metrics``: Prometheus text format (`monitoring.metrics.PipelineCollector`).
- ``GET /healthz``: the `flead health` report as JSON; 200 when healthy, 503 when not.
- ``GET /api/incidents``, ``GET /api/incidents/{id}``: stored incidents, with feedback and deliveries.
- ``POST /api/incidents/{id}/feedback``: ``false_positive`` | ``confirmed`` (+ note). Stored in
  `incident_feedback` and published as `flead.feedback/1` on `kafka.topics.feedback` for the stream job.
- ``GET /incidents/{id}/feedback``: a page with the incident and two buttons (the dashboards' incident table links
  here; the token is asked for once and kept in the browser).
- ``GET/POST /api/suppressions``, ``DELETE /api/suppressions/{id}``: suppression rules the router honours.
"""
from __future__ import annotations

import html
import json
import threading
import time
import uuid
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from config import Config
from monitoring.deliveries import ensure_collections
from monitoring.health import check_health
from monitoring.metrics import metrics_registry
from monitoring.notifications import NotificationSettings, drilldown_link, rfc3339, summary
from models.integrity import sign_record, signing_key
from monitoring.records import encode_feedback, feedback_record
from monitoring.suppression import check_rule
from storage.mongo import Store

MAX_INT = 2**53
MAX_ID_CHARS = 500
MAX_NOTE_CHARS = 2000
MAX_HISTORY = 20
PUBLISH_TIMEOUT_S = 5.0
INCIDENT_ID = Path(max_length=MAX_ID_CHARS, description="'<device_id>:<start_seq>'")


class FeedbackIn(BaseModel):
    """An operator's verdict on one incident."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["false_positive", "confirmed"]
    note: str = Field("", max_length=MAX_NOTE_CHARS)
    by: str | None = Field(None, max_length=200, description="who judged it (free text)")


class SuppressionIn(BaseModel):
    """A suppression rule: incidents of `device_id` (null: any) blaming `metric` (null: any), that started inside
    [`starts_at`, `ends_at`) (epoch ms; null: open), are not delivered."""

    model_config = ConfigDict(extra="forbid")

    device_id: str | None = Field(None, min_length=1, max_length=200)
    metric: str | None = Field(None, min_length=1, max_length=200)
    starts_at: int | None = Field(None, ge=0, le=MAX_INT)
    ends_at: int | None = Field(None, ge=0, le=MAX_INT)
    reason: str = Field("", max_length=500)


def now_ms() -> int:
    return int(time.time() * 1000)


def monitoring_routes(cfg: Config, db: Callable[[], Any], writer: Callable) -> APIRouter:
    """The routes above, on the API's lazily connected database `db()` and its token check `writer`."""
    router = APIRouter()
    registry, _ = metrics_registry(cfg, db)
    key = signing_key(cfg)
    ready: dict[str, Any] = {}
    lock = threading.Lock()

    def database():
        handle = db()
        if "collections" not in ready:
            ensure_collections(handle.db, cfg)
            ready["collections"] = True
        return handle

    def collection(key: str):
        return database().collection(key)

    def producer():
        with lock:
            if "producer" not in ready:
                from confluent_kafka import Producer
                ready["producer"] = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "log_level": 0,
                                              "message.timeout.ms": int(PUBLISH_TIMEOUT_S * 1000)})
            return ready["producer"]

    def incident_or_404(incident_id: str) -> dict:
        incident = collection("incidents").find_one({"_id": incident_id}, {"_id": 0})
        if incident is None:
            raise HTTPException(404, f"no incident {incident_id!r} (incidents are stored by the sink from "
                                     f"{cfg.kafka.topics.incidents})")
        return incident

    @router.get("/metrics", tags=["monitoring"], summary="Prometheus metrics of the pipeline",
                response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def get_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", tags=["monitoring"], summary="Each service up and keeping pace (503 when not)",
                responses={503: {"description": "not healthy: the body lists the problems"}})
    def get_healthz() -> JSONResponse:
        report = check_health(cfg)
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @router.get("/api/incidents", tags=["incidents"], summary="Stored incidents, newest first")
    def get_incidents(status: Literal["open", "resolved"] | None = None,
                      device_id: str | None = Query(None, max_length=200),
                      limit: int = Query(50, ge=1, le=1000)) -> list[dict]:
        query = {k: v for k, v in (("status", status), ("device_id", device_id)) if v is not None}
        return list(collection("incidents").find(query, {"_id": 0}).sort([("start_ts", -1)]).limit(limit))

    @router.get("/api/incidents/{incident_id}", tags=["incidents"],
                summary="One incident, with its feedback and deliveries")
    def get_incident(incident_id: str = INCIDENT_ID) -> dict:
        incident = incident_or_404(incident_id)
        feedback = collection("incident_feedback").find_one({"_id": incident_id}, {"_id": 0})
        deliveries = list(collection("deliveries").find(
            {"incident_id": incident_id}, {"_id": 1, "kind": 1, "status": 1, "state": 1, "attempts": 1,
                                           "delivered_at": 1, "last_error": 1}))
        return {"incident": incident, "feedback": feedback, "deliveries": deliveries,
                "links": {"drilldown": drilldown_link(NotificationSettings.from_config(cfg).drilldown_url,
                                                      incident["device_id"])}}

    @router.post("/api/incidents/{incident_id}/feedback", status_code=201, dependencies=[Depends(writer)],
                 tags=["incidents"], summary="Mark an incident a false positive or confirmed")
    def post_feedback(body: FeedbackIn, incident_id: str = INCIDENT_ID) -> dict:
        incident = incident_or_404(incident_id)
        now = now_ms()
        record = sign_record(feedback_record(incident, body.verdict, now), key)  # the stream job verifies it
        entry = {"verdict": body.verdict, "note": body.note, "by": body.by, "at": now}
        stored = collection("incident_feedback").find_one({"_id": incident_id}) or {}
        doc = {"_id": incident_id, "incident_id": incident_id, "device_id": incident["device_id"],
               "verdict": body.verdict, "note": body.note, "by": body.by,
               "created_at": stored.get("created_at", now), "updated_at": now,
               "history": (stored.get("history") or [])[-(MAX_HISTORY - 1):] + [entry],
               "peak_score": incident.get("peak_score"), "peak_ratio": incident.get("peak_ratio"),
               "metrics_to_blame": incident.get("metrics_to_blame"), "start_ts": incident.get("start_ts"),
               "model_version": incident.get("model_version"), "published": False}
        feedback = collection("incident_feedback")
        feedback.replace_one({"_id": incident_id}, doc, upsert=True)
        kafka = producer()
        kafka.produce(cfg.kafka.topics.feedback, key=incident["device_id"].encode(), value=encode_feedback(record))
        if kafka.flush(PUBLISH_TIMEOUT_S) > 0:
            raise HTTPException(503, f"feedback stored, but Kafka ({cfg.kafka_bootstrap}) did not take it for "
                                     f"{cfg.kafka.topics.feedback}; send it again")
        feedback.update_one({"_id": incident_id, "updated_at": now}, {"$set": {"published": True}})
        return {"incident_id": incident_id, "verdict": body.verdict, "stored": True, "published": True}

    @router.get("/api/incidents/{incident_id}/feedback", tags=["incidents"], summary="The verdict on an incident")
    def get_feedback(incident_id: str = INCIDENT_ID) -> dict:
        doc = collection("incident_feedback").find_one({"_id": incident_id}, {"_id": 0})
        if doc is None:
            raise HTTPException(404, f"no feedback on incident {incident_id!r} yet")
        return doc

    @router.get("/incidents/{incident_id}/feedback", response_class=HTMLResponse, include_in_schema=False)
    def feedback_page(incident_id: str = INCIDENT_ID) -> HTMLResponse:
        incident = collection("incidents").find_one({"_id": incident_id}, {"_id": 0})
        verdict = collection("incident_feedback").find_one({"_id": incident_id}, {"verdict": 1})
        return HTMLResponse(feedback_html(incident_id, incident, verdict and verdict.get("verdict"),
                                          NotificationSettings.from_config(cfg).drilldown_url),
                            status_code=200 if incident else 404)

    @router.get("/api/suppressions", tags=["suppressions"], summary="Suppression rules")
    def get_suppressions() -> list[dict]:
        return [{"id": d.pop("_id"), **d} for d in collection("suppressions").find().sort([("created_at", -1)])]

    @router.post("/api/suppressions", status_code=201, dependencies=[Depends(writer)], tags=["suppressions"],
                 summary="Add a suppression rule (device, metric, time window)")
    def post_suppression(rule: SuppressionIn) -> dict:
        doc = rule.model_dump()
        try:
            check_rule(doc)
        except ValueError as exc:
            raise HTTPException(400, str(exc))
        doc |= {"_id": uuid.uuid4().hex[:16], "created_at": now_ms()}
        collection("suppressions").insert_one(doc)
        return {"id": doc.pop("_id"), **doc}

    @router.delete("/api/suppressions/{rule_id}", status_code=204, dependencies=[Depends(writer)],
                   tags=["suppressions"], summary="Delete a suppression rule")
    def delete_suppression(rule_id: str = Path(max_length=100)) -> Response:
        if collection("suppressions").delete_one({"_id": rule_id}).deleted_count == 0:
            raise HTTPException(404, f"no suppression rule {rule_id!r}")
        return Response(status_code=204)

    return router


def feedback_html(incident_id: str, incident: dict | None, verdict: str | None, drilldown_url: str) -> str:
    """The feedback page: the incident in words, the current verdict, two buttons. Every value is escaped (incident
    fields come from Kafka); the POST goes to this API with the token the operator typed (kept in localStorage)."""
    esc = html.escape
    if incident is None:
        body = f"<p>No incident <code>{esc(incident_id)}</code> is stored.</p>"
    else:
        started = rfc3339(incident["start_ts"]) if isinstance(incident.get("start_ts"), int) else "?"
        body = (f"<p>{esc(summary(incident))}</p><p>Started {esc(started)} (UTC), "
                f"{esc(str(incident.get('n_flagged')))} of {esc(str(incident.get('n_readings')))} readings flagged, "
                f"model v{esc(str(incident.get('model_version')))}. "
                f"<a href=\"{esc(drilldown_link(drilldown_url, str(incident.get('device_id'))))}\">"
                f"Device drill-down</a></p><p>Current verdict: <b id=verdict>{esc(verdict or 'none')}</b></p>"
                "<label>API token <input id=token type=password size=40></label><br>"
                "<label>Note <input id=note size=60 maxlength=2000></label><br>"
                "<button data-verdict=false_positive>False positive</button> "
                "<button data-verdict=confirmed>Confirmed</button> <span id=result></span>")
    post_url = json.dumps(f"/api/incidents/{incident_id}/feedback").replace("<", "\\u003c")
    return f"""<!doctype html><html><head><meta charset=utf-8><title>FLEAD incident feedback</title></head>
<body style="font-family: sans-serif; max-width: 50em"><h1>Incident {esc(incident_id)}</h1>{body}
<script>
const url = {post_url};
const token = document.getElementById("token");
if (token) token.value = localStorage.getItem("flead_api_token") || "";
for (const button of document.querySelectorAll("button[data-verdict]")) {{
  button.onclick = async () => {{
    localStorage.setItem("flead_api_token", token.value);
    const response = await fetch(url, {{method: "POST", headers: {{"Content-Type": "application/json",
      "Authorization": "Bearer " + token.value}}, body: JSON.stringify({{verdict: button.dataset.verdict,
      note: document.getElementById("note").value}})}});
    const text = await response.text();
    document.getElementById("result").textContent = response.ok ? "saved" : response.status + " " + text;
    if (response.ok) document.getElementById("verdict").textContent = button.dataset.verdict;
  }};
}}
</script></body></html>"""
