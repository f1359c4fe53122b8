"""Receivers of incident notifications: an Alertmanager (``POST /api/v2/alerts``) and a generic JSON webhook.

`send` never raises: it returns an `Outcome` that says whether the notification arrived, and if not, whether a
retry can help (connection errors, timeouts, 5xx, 408, 429) or not (any other 4xx: the receiver refuses this
notification, so retrying would only repeat the refusal; the router dead-letters it at once).
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Protocol

import requests

from config import ConfigError
from monitoring.notifications import (NotificationSettings, alertmanager_alert, receiver_id, signature,
                                      webhook_body)

ALERTMANAGER = "alertmanager"
WEBHOOK = "webhook"
RETRYABLE_STATUS = {408, 425, 429}
MAX_ERROR_CHARS = 300


class Outcome(NamedTuple):
    """What one attempt achieved: ``ok``; else ``retry`` (worth another attempt) and the ``error`` text."""

    ok: bool
    retry: bool = False
    error: str | None = None
    retry_after_s: float | None = None


class Receiver(Protocol):
    id: str
    kind: str
    url: str

    def send(self, delivery: dict, now_ms: int) -> Outcome: ...


def _outcome(response: requests.Response) -> Outcome:
    if 200 <= response.status_code < 300:
        return Outcome(True)
    text = response.text[:MAX_ERROR_CHARS].strip()
    error = f"HTTP {response.status_code}: {text}" if text else f"HTTP {response.status_code}"
    retry_after = None
    if response.status_code == 429:
        try:
            retry_after = float(response.headers.get("Retry-After", ""))
        except ValueError:
            pass
    return Outcome(False, response.status_code >= 500 or response.status_code in RETRYABLE_STATUS, error,
                   retry_after)


class HttpReceiver:
    """Common part: one `requests.Session`, a timeout, errors as retryable outcomes."""

    kind = ""

    def __init__(self, url: str, settings: NotificationSettings, timeout_s: float):
        self.url = url.rstrip("/") if self.kind == ALERTMANAGER else url
        self.id = receiver_id(self.kind, url)
        self.settings = settings
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def post(self, target: str, body: bytes, headers: dict[str, str]) -> Outcome:
        try:
            response = self.session.post(target, data=body, timeout=self.timeout_s,
                                         headers={"Content-Type": "application/json", **headers})
        except requests.RequestException as exc:
            return Outcome(False, True, f"{exc.__class__.__name__}: {str(exc)[:MAX_ERROR_CHARS]}")
        return _outcome(response)


class AlertmanagerReceiver(HttpReceiver):
    """An Alertmanager (or anything speaking its API v2): one alert per incident, labels kept across states."""

    kind = ALERTMANAGER

    def alert(self, delivery: dict, now_ms: int) -> dict:
        return alertmanager_alert(delivery["incident"], self.settings, now_ms, delivery.get("labels"))

    def send(self, delivery: dict, now_ms: int) -> Outcome:
        body = json.dumps([self.alert(delivery, now_ms)]).encode()
        return self.post(f"{self.url}/api/v2/alerts", body, {})


class WebhookReceiver(HttpReceiver):
    """A generic JSON webhook: one request per incident state, with an ``Idempotency-Key`` header (the same on
    every retry and replay) and, when `router.webhook_secret` is set, an HMAC-SHA256 ``X-Flead-Signature``."""

    kind = WEBHOOK

    def __init__(self, url: str, settings: NotificationSettings, timeout_s: float, secret: str = ""):
        super().__init__(url, settings, timeout_s)
        self.secret = secret

    def send(self, delivery: dict, now_ms: int) -> Outcome:
        body = json.dumps(webhook_body(delivery["incident"], self.settings, delivery["_id"], now_ms)).encode()
        headers = {"Idempotency-Key": delivery["_id"]}
        if self.secret:
            headers["X-Flead-Signature"] = signature(self.secret, body)
        return self.post(self.url, body, headers)


def receivers_from_config(cfg: Any) -> list[HttpReceiver]:
    """The receivers of `router.alertmanager_urls` and `router.webhook_urls`."""
    settings = NotificationSettings.from_config(cfg)
    router = cfg.router
    receivers: list[HttpReceiver] = [AlertmanagerReceiver(str(url), settings, router.timeout_s)
                                     for url in router.alertmanager_urls]
    receivers += [WebhookReceiver(str(url), settings, router.timeout_s, router.webhook_secret)
                  for url in router.webhook_urls]
    for receiver in receivers:
        if not receiver.url.startswith(("http://", "https://")):
            raise ConfigError(f"router: receiver URL {receiver.url!r} must start with http:// or https://")
    return receivers
