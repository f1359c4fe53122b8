"""What the incident router sends, as pure functions: Alertmanager alerts, webhook bodies, links, ids, back-off.

An incident state becomes one notification per receiver; its idempotency key is ``<receiver>|<incident>|<status>``,
so a replayed incident record (at-least-once Kafka) maps onto the same delivery and is sent once.

>>> incident = sample_incident()
>>> alert = alertmanager_alert(incident, NotificationSettings("http://sup:8088", "http://api:8000"), 1_706_659_300_000)
>>> alert["labels"]["severity"], alert["labels"]["metrics_to_blame"], alert["startsAt"]
('warning', 'cpu,mem', '2024-01-31T00:00:00.000Z')
>>> [round(backoff_delay_s(n, 1.0, 2.0, 10.0, 0.0, 0.5), 1) for n in (1, 2, 3, 4, 5)]
[1.0, 2.0, 4.0, 8.0, 10.0]
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from monitoring.records import sample_incident  # noqa: F401 (doctest)

ALERT_NAME = "FleadIncident"
NOTIFICATION_SCHEMA = "flead.notification/1"
DRILLDOWN_PATH = "/superset/dashboard/flead-device/"
DRILLDOWN_FILTER = "NATIVE_FILTER-flead-device"  # visualization/bundle/dashboards/device_drilldown.yaml
STALE_AFTER_RESENDS = 4  # an open alert's endsAt: Alertmanager resolves it if 4 re-sends in a row are missed


@dataclass(frozen=True)
class NotificationSettings:
    """Links and thresholds of notifications (`router.*`): ``drilldown_url`` and ``api_url`` are base URLs."""

    drilldown_url: str
    api_url: str
    critical_ratio: float = 3.0
    resend_interval_s: float = 60.0

    @classmethod
    def from_config(cls, cfg: Any) -> "NotificationSettings":
        router = cfg.router
        return cls(drilldown_url=router.drilldown_url or f"http://{cfg.superset.host}:{cfg.superset.port}",
                   api_url=router.api_url or f"http://{cfg.api.host}:{cfg.api.port}",
                   critical_ratio=router.critical_ratio, resend_interval_s=router.resend_interval_s)


def severity(incident: dict, critical_ratio: float) -> str:
    """``critical`` when the incident's peak reached `critical_ratio` times the threshold, else ``warning``."""
    ratio = incident.get("peak_ratio")
    return "critical" if ratio is not None and ratio >= critical_ratio else "warning"


def worth_notifying(incident: dict, min_flagged: int, critical_ratio: float) -> bool:
    """True once an incident is more than the detector's designed false-alarm rate: it has `min_flagged` flagged
    readings, or its peak reached `critical_ratio` times the threshold. The threshold is set so that a share
    ``threshold.target_false_alarm_rate`` of normal readings exceed it (1 in 100), and those come alone: paging
    on every lone flag pages on that rate by design (a device reporting each minute: ~14 times a day), while two
    flags within an incident's gap happen by chance about ``gap_readings x rate²`` per reading (~1 in 1,000).

    >>> lone, critical = sample_incident(n_flagged=1, peak_ratio=1.4), sample_incident(n_flagged=1, peak_ratio=40.0)
    >>> worth_notifying(lone, 2, 3.0), worth_notifying(critical, 2, 3.0), worth_notifying(lone, 1, 3.0)
    (False, True, True)
    """
    ratio = incident.get("peak_ratio")
    return incident["n_flagged"] >= min_flagged or (ratio is not None and ratio >= critical_ratio)


def blamed_metrics(incident: dict) -> list[str]:
    """The incident's metrics to blame, largest share first."""
    blame = sorted(incident.get("metrics_to_blame") or [], key=lambda item: -item["share"])
    return [item["metric"] for item in blame]


def rison_string(text: str) -> str:
    """`text` as a rison string literal (the encoding of Superset's ``native_filters`` URL parameter).

    >>> rison_string("it's!")
    "'it!'s!!'"
    """
    return "'" + text.replace("!", "!!").replace("'", "!'") + "'"


def drilldown_link(base_url: str, device_id: str) -> str:
    """The device drill-down dashboard with its device filter set to `device_id` (as the alerts table links)."""
    value = rison_string(device_id)
    filters = (f"({DRILLDOWN_FILTER}:(extraFormData:(filters:!((col:device_id,op:IN,val:!({value})))),"
               f"filterState:(value:!({value}))))")
    return f"{base_url.rstrip('/')}{DRILLDOWN_PATH}?native_filters={quote(filters, safe='(),:!')}"


def feedback_link(api_url: str, incident_id: str) -> str:
    """The API's feedback page of one incident (buttons: false positive / confirmed)."""
    return f"{api_url.rstrip('/')}/incidents/{quote(incident_id, safe='')}/feedback"


def rfc3339(epoch_ms: int) -> str:
    """Epoch milliseconds as the RFC 3339 UTC timestamp Alertmanager reads."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def alert_labels(incident: dict, critical_ratio: float) -> dict[str, str]:
    """The labels that identify the incident's alert in Alertmanager (its fingerprint). A later state must be
    sent with the labels of the first (the router keeps them), or Alertmanager would see another alert."""
    return {"alertname": ALERT_NAME, "device": incident["device_id"], "incident_id": incident["incident_id"],
            "severity": severity(incident, critical_ratio), "metrics_to_blame": ",".join(blamed_metrics(incident)),
            "source": "flead"}


def summary(incident: dict) -> str:
    """One line for people: device, how far above the threshold, the metrics to blame and those that stopped moving.

    >>> stuck = summary(sample_incident(stuck_metrics=[{"metric": "mem", "repeats": 40, "usual": 6}])).split("; ")
    >>> stuck[0]
    'dev-1: stuck-metric incident (open), peak 2.5x threshold'
    >>> stuck[-1]
    'mem stopped moving: the same value 41 readings in a row (before: at most 7)'
    """
    blame = ", ".join(f"{item['metric']} ({item['share']:.0%})" for item in
                      sorted(incident.get("metrics_to_blame") or [], key=lambda item: -item["share"]))
    ratio = incident.get("peak_ratio")
    peak = f"peak {ratio:.3g}x threshold" if ratio is not None else f"peak score {incident['peak_score']:.3g}"
    state = "resolved" if incident["status"] == "resolved" else "open"
    stuck = "".join(f"; {item['metric']} stopped moving: the same value {item['repeats'] + 1} readings in a row "
                    f"(before: at most {item['usual'] + 1})" for item in incident.get("stuck_metrics") or [])
    kind = "stuck-metric" if stuck else "anomaly"
    return f"{incident['device_id']}: {kind} incident ({state}), {peak}; metrics to blame: {blame or 'n/a'}{stuck}"


def alertmanager_alert(incident: dict, settings: NotificationSettings, now_ms: int,
                       labels: dict[str, str] | None = None) -> dict:
    """One element of Alertmanager's ``POST /api/v2/alerts`` body for this incident state.

    An open incident's ``endsAt`` is `STALE_AFTER_RESENDS` re-send intervals ahead (the router re-sends it while it
    stays open, as Prometheus does); a resolved one's is its last flagged reading, never before it started nor
    after now."""
    starts = incident["start_ts"]
    if incident["status"] == "resolved":
        ended = incident.get("end_ts")
        ends = max(starts, min(now_ms if ended is None else ended, now_ms))
    else:
        ends = max(starts, now_ms) + int(STALE_AFTER_RESENDS * settings.resend_interval_s * 1000)
    annotations = {"summary": summary(incident),
                   "description": (f"{incident['n_flagged']} of {incident['n_readings']} readings flagged, seq "
                                   f"{incident['start_seq']}-{incident['end_seq']}, model v{incident['model_version']}"
                                   f" (global v{incident['global_version']})"),
                   "peak_score": f"{incident['peak_score']:.6g}",
                   "peak_ratio": "" if incident.get("peak_ratio") is None else f"{incident['peak_ratio']:.6g}",
                   "feedback_url": feedback_link(settings.api_url, incident["incident_id"])}
    return {"labels": labels or alert_labels(incident, settings.critical_ratio), "annotations": annotations,
            "startsAt": rfc3339(starts), "endsAt": rfc3339(ends),
            "generatorURL": drilldown_link(settings.drilldown_url, incident["device_id"])}


def webhook_body(incident: dict, settings: NotificationSettings, idempotency_key: str, sent_at_ms: int) -> dict:
    """The generic webhook's JSON body: the incident record itself, with the event, severity and links."""
    event = "incident_resolved" if incident["status"] == "resolved" else "incident_opened"
    return {"schema": NOTIFICATION_SCHEMA, "event": event,
            "idempotency_key": idempotency_key, "severity": severity(incident, settings.critical_ratio),
            "summary": summary(incident), "incident": {k: v for k, v in incident.items() if k != "schema"},
            "links": {"drilldown": drilldown_link(settings.drilldown_url, incident["device_id"]),
                      "feedback": feedback_link(settings.api_url, incident["incident_id"])},
            "sent_at": sent_at_ms}


def signature(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body>``: the X-Flead-Signature header a webhook receiver can check."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def receiver_id(kind: str, url: str) -> str:
    """A short stable name of one receiver (kind and URL): part of every delivery's id."""
    return f"{kind}-{hashlib.sha1(f'{kind} {url}'.encode()).hexdigest()[:10]}"


def delivery_id(receiver: str, incident_id: str, status: str) -> str:
    """The idempotency key of one incident state at one receiver."""
    return f"{receiver}|{incident_id}|{status}"


def backoff_delay_s(attempt: int, initial_s: float, factor: float, maximum_s: float, jitter: float,
                    uniform: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): ``initial * factor^(attempt-1)`` capped at
    `maximum_s`, shortened by up to `jitter` of itself (`uniform` in [0, 1) is the random draw), so that many
    deliveries failing together do not retry in lock-step."""
    if attempt < 1:
        raise ValueError(f"attempt: expected 1 or more, got {attempt}")
    exponent = min(attempt - 1, 1000)  # factor ** 1000 overflows for factor > ~2; the cap applies long before
    try:
        delay = initial_s * factor ** exponent
    except OverflowError:
        delay = maximum_s
    return min(delay, maximum_s) * (1.0 - jitter * uniform)
