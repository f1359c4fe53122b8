"""Is each service up and keeping pace? (`flead health`, `GET /healthz`)

- Servers: Kafka answers a metadata request, MongoDB a ping.
- Processes flead started (pid files in the state directory: stream, sink, router, api, scheduler, ...): ``up``,
  ``down`` (its pid file is there, the process is not), or ``not started``.
- Keeping pace: each consumer group on FLEAD's topics is at most `health.max_lag_messages` behind (stream job,
  sink, router; the stream job's offsets move at checkpoints). A consumer that died shows up here as its lag grows,
  also when it runs elsewhere (a Flink cluster, another host).

Healthy = both servers answer, no process is down, and every group keeps pace. ``not started`` is not unhealthy: a
deployment runs the parts it needs.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Mapping

from config import Config

UP, DOWN, NOT_STARTED, UNKNOWN = "up", "down", "not started", "unknown"
MANAGED = ("stream", "sink", "router", "api", "scheduler", "superset")  # shown even when not started


def service_groups(cfg: Config) -> dict[str, str]:
    """Consumer group → the service it belongs to."""
    from storage.sink import MongoSink

    sink_group = inspect.signature(MongoSink).parameters["group_id"].default
    return {cfg.stream.consumer_group: "stream", f"{cfg.stream.consumer_group}-global": "stream",
            sink_group: "sink", cfg.router.consumer_group: "router"}


def assess(servers: Mapping[str, bool], process_states: Mapping[str, str], group_lags: Mapping[str, int] | None,
           groups: Mapping[str, str], max_lag: int) -> dict[str, Any]:
    """The health report from what was observed (pure).

    `servers`: kafka/mongo → answers; `process_states`: name → up/down/not started; `group_lags`: consumer group →
    messages behind (None when Kafka could not be asked); `groups`: group → service.

    >>> report = assess({"kafka": True, "mongo": True}, {"sink": "up"}, {"flead-mongo-sink": 50},
    ...                 {"flead-mongo-sink": "sink"}, max_lag=10)
    >>> report["ok"], report["services"]["sink"]["keeping_pace"]
    (False, False)
    """
    services: dict[str, dict[str, Any]] = {
        name: {"state": UP if ok else DOWN, "lag": None, "keeping_pace": None} for name, ok in servers.items()}
    for name, state in process_states.items():
        services[name] = {"state": state, "lag": None, "keeping_pace": None}
    consumer_groups: dict[str, dict[str, Any]] = {}
    for group, lag in (group_lags or {}).items():
        service = groups.get(group, group)
        pace = lag <= max_lag
        consumer_groups[group] = {"service": service, "lag": lag, "keeping_pace": pace}
        entry = services.setdefault(service, {"state": UNKNOWN, "lag": None, "keeping_pace": None})
        entry["lag"] = (entry["lag"] or 0) + lag
        entry["keeping_pace"] = pace and entry["keeping_pace"] is not False
    problems = [f"{name}: {entry['state']}" for name, entry in services.items() if entry["state"] == DOWN]
    problems += [f"{group}: {info['lag']} messages behind (limit {max_lag})"
                 for group, info in consumer_groups.items() if not info["keeping_pace"]]
    if group_lags is None:
        problems.append("consumer lag unknown (Kafka did not answer)")
    return {"ok": not problems, "problems": problems, "max_lag_messages": max_lag, "services": services,
            "consumer_groups": consumer_groups}


def process_states(cfg: Config) -> dict[str, str]:
    """up / down / not started for every process flead manages in this state directory."""
    from services import processes

    run = processes.run_dir(cfg.state_dir)
    names = set(MANAGED) | ({p.stem for p in run.glob("*.pid")} if run.exists() else set())
    names -= {"kafka", "mongo"}  # reported as servers
    states = {}
    for name in sorted(names):
        had_pid_file = (run / f"{name}.pid").exists()
        running = processes.running_pid(cfg.state_dir, name) is not None
        states[name] = UP if running else (DOWN if had_pid_file else NOT_STARTED)
    return states


def check_health(cfg: Config, lags: list | None = None) -> dict[str, Any]:
    """Observe servers, processes and consumer lag now (or use `lags`, `monitoring.lag.consumer_lags` just read),
    and `assess` them."""
    from monitoring.lag import consumer_lags, total_lag_by_group
    from storage.mongo import mongo_healthy
    from telemetry.brokers import kafka_healthy

    kafka_up = kafka_healthy(cfg.kafka_bootstrap, timeout=3.0)
    servers = {"kafka": kafka_up, "mongo": mongo_healthy(cfg.mongo_uri, timeout_ms=3000)}
    if lags is None and kafka_up:
        try:
            lags = consumer_lags(cfg)
        except Exception:  # any admin client failure: lag unknown, reported as a problem
            lags = None
    group_lags = None if lags is None else total_lag_by_group(lags)
    report = assess(servers, process_states(cfg), group_lags, service_groups(cfg), cfg.health.max_lag_messages)
    report["checked_at"] = int(time.time() * 1000)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as lines for people (`flead health`)."""
    lines = []
    for name, entry in report["services"].items():
        pace = {True: "keeping pace", False: "FALLING BEHIND", None: ""}[entry["keeping_pace"]]
        lag = f"lag {entry['lag']}" if entry["lag"] is not None else ""
        lines.append(f"{name:<12} {entry['state']:<12} {lag:<14} {pace}".rstrip())
    lines.append("healthy" if report["ok"] else "NOT HEALTHY: " + "; ".join(report["problems"]))
    return "\n".join(lines)
