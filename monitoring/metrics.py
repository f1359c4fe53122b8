"""Prometheus metrics of the pipeline, read at scrape time from MongoDB and Kafka (`GET /metrics` on the API).

`PipelineCollector` is a `prometheus_client` custom collector: each scrape yields metric families built from one
*reading* of the stores (`PipelineReader`, consumer lag, health). A reading older than `metrics.cache_s` is
refreshed in a background thread while scrapes keep getting the previous one, so a scrape costs milliseconds
whatever the stores cost, and many scrapers cost MongoDB nothing more.
A figure that could not be read is left out of that scrape (and `flead_metrics_read_errors_total` counts it), so one
unavailable source never hides the others.

Per-device series are bounded: the `metrics.top_devices` devices with the most anomalies plus the devices of
`metrics.device_allow_list`; the others are summed under ``device="_other"`` (fleet totals have their own series,
which never decrease). A device entering or leaving the top set moves its counts between its own series and
``_other``: alert on allow-listed devices or on fleet totals when that matters. docs/monitoring.md lists every series.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from config import Config

log = logging.getLogger(__name__)

OTHER = "_other"
MAX_LABEL_CHARS = 200

REASON_CLASSES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern)) for name, pattern in (
    ("delivery_failed", r"^delivery to "),
    ("incident_invalid", r"^incident: "),
    ("signature_refused", r"^(\w+: )?(unsigned: |bad signature: )"),
    ("not_json", r"not JSON|not a JSON object|no value \(a tombstone"),
    ("missing_field", r"missing (required )?field"),
    ("unknown_schema", r"schema"),
    ("wrong_type", r"expected "),
    ("out_of_range", r"out of range|too large|at most|below the minimum|not a finite|longer than"),
    ("unknown_metrics", r"not in the device's model"),
    ("device_key_mismatch", r"under the Kafka key"),
    ("global_model_refused", r"global model refused"),
    ("non_finite_metric", r"non-finite|NaN|nan_policy"),
))


def reason_class(reason: str) -> str:
    """A bounded class for a dead letter's free-text reason (the label of `flead_dead_letters_total`).

    >>> reason_class("missing field 'ts'"), reason_class("metrics.m03: expected a number, got str")
    ('missing_field', 'wrong_type')
    >>> reason_class("something new")
    'other'
    """
    for name, pattern in REASON_CLASSES:
        if pattern.search(reason):
            return name
    return "other"


def select_devices(totals: dict[str, tuple[int, int]], top_n: int, allow_list: Iterable[str]) -> list[str]:
    """The devices that get series of their own: the allow-list, then the `top_n` others with the most anomalies
    (ties: more readings, then name).

    >>> select_devices({"a": (10, 1), "b": (10, 5), "c": (99, 5), "d": (1, 0)}, 2, ["d"])
    ['d', 'c', 'b']
    """
    chosen = [str(d) for d in allow_list]
    ranked = sorted((d for d in totals if d not in chosen), key=lambda d: (-totals[d][1], -totals[d][0], d))
    return chosen + ranked[:max(0, top_n)]


def label(value: Any) -> str:
    """A label value of bounded length."""
    text = str(value)
    return text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS] + "..."


class Reading(dict):
    """One reading of every source: figure name → value, or absent when it could not be read."""


class PipelineCollector(Collector):
    """Builds FLEAD's metric families from a cached `Reading` (see the module docstring)."""

    def __init__(self, cfg: Config, db: Callable[[], Any], clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self._db = db
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: Reading | None = None
        self._read_at = -math.inf
        self._refreshing = False
        self.read_errors: dict[str, int] = {}
        self.last_read_seconds = 0.0

    # -- reading (cached) -----------------------------------------------------------------------------------------

    def reading(self) -> Reading:
        """The newest reading. Once it is `metrics.cache_s` old, a refresh starts in the background (one at a
        time) and scrapes keep getting the previous reading meanwhile: a scrape never waits for the stores, except
        the very first. `flead_metrics_read_timestamp_seconds` says when the reading shown was taken."""
        with self._lock:
            if self._reading is None:
                self._refresh()
            elif self._clock() - self._read_at >= self.cfg.metrics.cache_s and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh_in_background, name="flead-metrics", daemon=True).start()
            return self._reading

    def _refresh(self) -> None:
        read_at, started, wall = self._clock(), time.perf_counter(), time.time()
        reading = self.read()
        reading["read_at"] = wall
        self.last_read_seconds = time.perf_counter() - started
        self._reading, self._read_at = reading, read_at

    def _refresh_in_background(self) -> None:
        try:
            self._refresh()
        finally:
            self._refreshing = False

    def _try(self, reading: Reading, name: str, fetch: Callable[[], Any]) -> None:
        try:
            reading[name] = fetch()
        except Exception as exc:  # a source that cannot be read is left out of this scrape, and counted
            self.read_errors[name] = self.read_errors.get(name, 0) + 1
            log.warning("metrics: could not read %s: %s", name, exc)

    def read(self) -> Reading:
        from monitoring.health import check_health
        from monitoring.lag import consumer_lags
        from monitoring.sources import PipelineReader

        reading = Reading()
        metrics = self.cfg.metrics
        try:
            source = PipelineReader(self._db(), self.cfg)
        except Exception as exc:
            self.read_errors["mongodb"] = self.read_errors.get("mongodb", 0) + 1
            log.warning("metrics: MongoDB unavailable: %s", exc)
            source = None
        if source is not None:
            self._try(reading, "device_summaries", source.devices)
            if "device_summaries" in reading:
                summaries = reading.pop("device_summaries")
                reading["device_totals"] = {d: (s.readings, s.anomalies) for d, s in summaries.items()}
                reading["devices"] = select_devices(reading["device_totals"], metrics.top_devices,
                                                    metrics.device_allow_list)
                reading["latest_buckets"] = {d: summaries[d].latest for d in reading["devices"] if d in summaries}
            self._try(reading, "dead_letters", source.dead_letters_by_reason)
            self._try(reading, "incidents", source.incidents_by_status)
            self._try(reading, "incidents_never_paged", source.incidents_never_paged)
            self._try(reading, "drift_events", source.drift_events)
            self._try(reading, "feedback", source.feedback_by_verdict)
            self._try(reading, "last_round", source.last_round)
            self._try(reading, "global_version", source.latest_global_version)
            since = int(time.time() * 1000) - metrics.active_window_s * 1000
            self._try(reading, "devices_by_version", lambda: source.devices_by_global_version(since))
            self._try(reading, "deliveries", source.deliveries_by_state)
            self._try(reading, "suppressions", source.suppression_rules)
        self._try(reading, "lags", lambda: consumer_lags(self.cfg))
        self._try(reading, "health", lambda: check_health(self.cfg, reading.get("lags")))
        return reading

    # -- families -------------------------------------------------------------------------------------------------

    def describe(self) -> list:
        return []  # families are built per scrape; registering must not trigger a read

    def collect(self) -> Iterator[Metric]:
        reading = self.reading()
        yield from self._readings(reading)
        yield from self._pipeline(reading)
        yield from self._federation(reading)
        yield from self._routing(reading)
        yield from self._kafka(reading)
        errors = CounterMetricFamily("flead_metrics_read_errors", "Sources /metrics could not read, by source",
                                     labels=["source"])
        for name, n in sorted(self.read_errors.items()):
            errors.add_metric([name], n)
        yield errors
        yield GaugeMetricFamily("flead_metrics_read_seconds", "Time the last refresh of /metrics' sources took",
                                value=self.last_read_seconds)
        yield GaugeMetricFamily("flead_metrics_read_timestamp_seconds", "When the reading these figures come from "
                                "was taken (refreshed in the background every metrics.cache_s)",
                                value=reading["read_at"])

    def _readings(self, reading: Reading) -> Iterator[Metric]:
        if "device_totals" not in reading:
            return
        totals, devices = reading["device_totals"], reading["devices"]
        fleet_n = sum(n for n, _ in totals.values())
        fleet_a = sum(a for _, a in totals.values())
        yield CounterMetricFamily("flead_readings_scored", "Readings scored, whole fleet (from score_rollups)",
                                  value=fleet_n)
        yield CounterMetricFamily("flead_anomalies", "Readings flagged anomalous, whole fleet", value=fleet_a)
        yield GaugeMetricFamily("flead_devices", "Devices with scored readings", value=len(totals))
        scored = CounterMetricFamily("flead_device_readings_scored", "Readings scored per device "
                                     "(top devices and allow-list; the rest under device=\"_other\")",
                                     labels=["device"])
        anomalies = CounterMetricFamily("flead_device_anomalies", "Anomalous readings per device (bounded as "
                                        "flead_device_readings_scored)", labels=["device"])
        shown_n = shown_a = 0
        for device in devices:
            n, a = totals.get(device, (0, 0))
            scored.add_metric([label(device)], n)
            anomalies.add_metric([label(device)], a)
            shown_n, shown_a = shown_n + n, shown_a + a
        if len(totals) > len(set(devices) & set(totals)):
            scored.add_metric([OTHER], fleet_n - shown_n)
            anomalies.add_metric([OTHER], fleet_a - shown_a)
        yield scored
        yield anomalies
        yield from self._scores(reading.get("latest_buckets"))

    @staticmethod
    def _scores(buckets: dict | None) -> Iterator[Metric]:
        if buckets is None:
            return
        score_max = GaugeMetricFamily("flead_device_score_max", "Highest anomaly score of the device's newest "
                                      "roll-up bucket (rollups.device_bucket_s of event time)", labels=["device"])
        score_mean = GaugeMetricFamily("flead_device_score_mean", "Mean anomaly score of the device's newest "
                                       "roll-up bucket", labels=["device"])
        threshold = GaugeMetricFamily("flead_device_threshold", "Highest threshold of the device's newest roll-up "
                                      "bucket (absent while it warms up)", labels=["device"])
        bucket_time = GaugeMetricFamily("flead_device_bucket_timestamp_seconds", "Event time at which the "
                                        "device's newest roll-up bucket starts", labels=["device"])
        for device, doc in buckets.items():
            score_max.add_metric([label(device)], doc["score_max"])
            score_mean.add_metric([label(device)], doc["score_sum"] / doc["n"] if doc.get("n") else math.nan)
            if doc.get("threshold_max") is not None:
                threshold.add_metric([label(device)], doc["threshold_max"])
            bucket_time.add_metric([label(device)], doc["ts"] / 1000)
        yield from (score_max, score_mean, threshold, bucket_time)

    @staticmethod
    def _pipeline(reading: Reading) -> Iterator[Metric]:
        if "dead_letters" in reading:
            by_class: dict[str, int] = {}
            for reason, n in reading["dead_letters"].items():
                by_class[reason_class(reason)] = by_class.get(reason_class(reason), 0) + n
            family = CounterMetricFamily("flead_dead_letters", "Dead letters (refused input, failed deliveries) by "
                                         "reason class", labels=["reason_class"])
            for name, n in sorted(by_class.items()):
                family.add_metric([name], n)
            yield family
        if "incidents" in reading:
            by_status = reading["incidents"]
            yield GaugeMetricFamily("flead_incidents_open", "Incidents open now", value=by_status.get("open", 0))
            family = CounterMetricFamily("flead_incidents", "Incidents stored, by status", labels=["status"])
            for status in ("open", "resolved"):
                family.add_metric([status], by_status.get(status, 0))
            yield family
        if "incidents_never_paged" in reading:
            yield CounterMetricFamily("flead_incidents_never_paged", "Resolved incidents the router held back: "
                                      "fewer flagged readings than router.notify_min_flagged and a peak below "
                                      "router.critical_ratio x threshold", value=reading["incidents_never_paged"])
        if "drift_events" in reading:
            yield CounterMetricFamily("flead_drift_events", "Drift events (a device re-baselined)",
                                      value=reading["drift_events"])
        if "feedback" in reading:
            verdicts = reading["feedback"]
            family = CounterMetricFamily("flead_incident_feedback", "Operators' verdicts on incidents",
                                         labels=["verdict"])
            for verdict in ("false_positive", "confirmed"):
                family.add_metric([verdict], verdicts.get(verdict, 0))
            yield family
            judged = verdicts.get("false_positive", 0) + verdicts.get("confirmed", 0)
            if judged:
                yield GaugeMetricFamily("flead_feedback_precision", "Share of judged incidents confirmed by "
                                        "operators (confirmed / (confirmed + false_positive))",
                                        value=verdicts.get("confirmed", 0) / judged)

    @staticmethod
    def _federation(reading: Reading) -> Iterator[Metric]:
        last = reading.get("last_round")
        if last:
            for name, field, text in (
                    ("flead_last_round_version", "version", "Global model version the last round published"),
                    ("flead_last_round_participants", "n_participants", "Devices whose updates the last round used"),
                    ("flead_last_round_rejections", "n_rejected", "Updates the last round rejected"),
                    ("flead_last_round_duration_seconds", "duration_s", "Duration of the last round")):
                if last.get(field) is not None:
                    yield GaugeMetricFamily(name, text, value=last[field])
            if last.get("started_at") is not None:
                yield GaugeMetricFamily("flead_last_round_timestamp_seconds", "When the last round started",
                                        value=last["started_at"] / 1000)
        if reading.get("global_version") is not None:
            yield GaugeMetricFamily("flead_global_model_version", "Newest global model version",
                                    value=reading["global_version"])
        if "devices_by_version" in reading:
            family = GaugeMetricFamily("flead_devices_on_global_version", "Devices active within "
                                       "metrics.active_window_s, by the global version their newest snapshot "
                                       "builds on (0 = none adopted)", labels=["global_version"])
            for version, n in sorted(reading["devices_by_version"].items()):
                family.add_metric([str(version)], n)
            yield family

    @staticmethod
    def _routing(reading: Reading) -> Iterator[Metric]:
        if "deliveries" in reading:
            family = GaugeMetricFamily("flead_deliveries", "Incident deliveries by receiver kind and state "
                                       "(pending, delivered, dead, suppressed)", labels=["receiver", "state"])
            for (kind, state), n in sorted(reading["deliveries"].items()):
                family.add_metric([kind, state], n)
            yield family
        if "suppressions" in reading:
            yield GaugeMetricFamily("flead_suppression_rules", "Suppression rules stored",
                                    value=reading["suppressions"])

    @staticmethod
    def _kafka(reading: Reading) -> Iterator[Metric]:
        if "lags" in reading:
            family = GaugeMetricFamily("flead_consumer_lag", "Messages a consumer group is behind, per partition",
                                       labels=["group", "topic", "partition"])
            for item in reading["lags"]:
                family.add_metric([item.group, item.topic, str(item.partition)], item.lag)
            yield family
        health = reading.get("health")
        if health:
            yield GaugeMetricFamily("flead_healthy", "1 when every service is up and keeping pace (see /healthz)",
                                    value=1.0 if health["ok"] else 0.0)
            up = GaugeMetricFamily("flead_service_up", "1 up, 0 down, -1 not started / unknown", labels=["service"])
            for name, entry in sorted(health["services"].items()):
                up.add_metric([name], {"up": 1.0, "down": 0.0}.get(entry["state"], -1.0))
            yield up


def metrics_registry(cfg: Config, db: Callable[[], Any]) -> tuple[Any, PipelineCollector]:
    """A fresh registry holding only FLEAD's collector (no process or platform series of the API process itself)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    collector = PipelineCollector(cfg, db)
    registry.register(collector)
    return registry, collector
