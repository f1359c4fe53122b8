"""The stream job's own metrics: Flink's Prometheus reporter, served on `metrics.flink_reporter_host` only.

Flink 2.2's `PrometheusReporter` listens on every interface, with no setting to change it; the factory in
`monitoring/flink_reporter` (compiled by orchestration/setup.sh into build/flink-libs) builds the same reporter on one
address. Both jars are loaded like the Kafka connector, through ``pipeline.jars``: in the local MiniCluster that is
what starts the reporter. (A standalone cluster loads reporters when it starts: put both jars in a folder under its
``plugins/`` and the same ``metrics.reporter.prom.*`` keys in its configuration.)

Every Flink metric is exported, among them the scorer's counters (``records_scored``, ``anomalies``,
``dead_letters``, ...) as ``flink_taskmanager_job_task_operator_<name>``, and Kafka source/sink metrics.
"""
from __future__ import annotations

from typing import Any

FACTORY = "io.flead.metrics.LoopbackPrometheusReporterFactory"
REPORTER_JAR = "flead-prometheus-reporter.jar"
PROMETHEUS_JAR_GLOB = "flink-metrics-prometheus-*.jar"


def prometheus_reporter(cfg: Any) -> tuple[dict[str, str], list[str]]:
    """(Flink settings, jar URIs for ``pipeline.jars``) of the reporter; nothing when `metrics.flink_reporter_port`
    is empty or the jars were not built (the job then runs without it)."""
    port = str(cfg.metrics.flink_reporter_port).strip()
    libs = cfg.build_dir / "flink-libs"
    jars = sorted(libs.glob(PROMETHEUS_JAR_GLOB))[-1:] + [libs / REPORTER_JAR]
    if not port or not all(jar.exists() for jar in jars) or len(jars) < 2:
        return {}, []
    settings = {"metrics.reporter.prom.factory.class": FACTORY,
                "metrics.reporter.prom.host": cfg.metrics.flink_reporter_host,
                "metrics.reporter.prom.port": port}
    return settings, [jar.as_uri() for jar in jars]
