"""The incident router: incident records from Kafka to Alertmanager and webhooks, at least once, each state once.

    flead router start | stop | run [--until-idle S] | retry-dead

A service of its own (not part of the storage sink): delivery waits on other people's servers, retries for minutes
with back-off and must survive their outages, while the sink has to keep pace with the stream. Sharing a process
would let a slow receiver hold back storage (or force a thread pool and a second commit discipline into the sink);
apart, each has its own consumer group, its lag in `/metrics`, its restart.

Loop: (1) consume incident records (consumer group `router.consumer_group`), check each (`records.check_incident`;
a bad one becomes a dead letter), and write one delivery per configured receiver into the outbox
(`deliveries.DeliveryStore`) — suppressed there if a suppression rule matches; an incident not yet worth a page
(`notifications.worth_notifying`: fewer than `router.notify_min_flagged` flagged readings and no critical peak)
gets none until a later state of it is, and its resolution none either — then commit the offsets;
(2) send the due deliveries, one at a time, in order per incident (a resolution waits for its opening);
failures are retried with exponential back-off and jitter, and after `router.max_attempts` (or a refusal such as
HTTP 400) the delivery is dead and a dead letter names the receiver and the last error; (3) re-send open incidents
to Alertmanager every `router.resend_interval_s` so it keeps them firing.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from typing import Callable, Sequence

from config import Config, ConfigError
from models.integrity import signing_key, verify_record
from monitoring.deliveries import PENDING, SUPPRESSED, DeliveryStore, ensure_collections
from monitoring.notifications import alert_labels, backoff_delay_s, delivery_id, worth_notifying
from monitoring.receivers import ALERTMANAGER, HttpReceiver, receivers_from_config
from telemetry.schema import check_incident
from monitoring.suppression import matching_rule
from storage.mongo import Store
from telemetry.schema import InvalidMessage, dead_letter_record, load_object

log = logging.getLogger(__name__)

POLL_BATCH = 500
POLL_TIMEOUT_S = 0.2
RULES_CACHE_S = 2.0
SEND_BATCH = 50  # deliveries sent per loop turn before the router polls Kafka again


def now_ms() -> int:
    return int(time.time() * 1000)


class IncidentRouter:
    """Consumes `kafka.topics.incidents`, keeps the outbox, sends; `stats` counts what happened."""

    def __init__(self, cfg: Config, receivers: Sequence[HttpReceiver] | None = None,
                 clock: Callable[[], int] = now_ms, uniform: Callable[[], float] = random.random):
        from confluent_kafka import Consumer

        self.cfg = cfg
        self.router = cfg.router
        if not self.router.notify_min_flagged >= 1:
            raise ConfigError(f"router.notify_min_flagged must be at least 1 flagged reading (1: every incident at "
                              f"once), got {self.router.notify_min_flagged}")
        self.signing_key = signing_key(cfg)  # only the stream job's signed incidents are routed
        self.receivers = list(receivers_from_config(cfg) if receivers is None else receivers)
        self.by_id = {r.id: r for r in self.receivers}
        self.clock = clock
        self.uniform = uniform
        self.db = Store(cfg)
        ensure_collections(self.db.db, cfg)
        self.store = DeliveryStore(self.db, cfg)
        self.topic = cfg.kafka.topics.incidents
        self.consumer = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": self.router.consumer_group,
                                  "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3})
        self.consumer.subscribe([self.topic])
        self.stats: Counter = Counter()
        self._rules: list[dict] = []
        self._rules_read_at = -1e18
        if not self.receivers:
            log.warning("router: no receivers configured (router.alertmanager_urls, router.webhook_urls): "
                        "incidents are consumed and not sent anywhere")

    # -- (1) incident records into the outbox --------------------------------------------------------------------

    def rules(self) -> list[dict]:
        """The suppression rules, read again at most every `RULES_CACHE_S`."""
        if time.monotonic() - self._rules_read_at >= RULES_CACHE_S:
            self._rules = list(self.db.collection("suppressions").find())
            self._rules_read_at = time.monotonic()
        return self._rules

    def poll_once(self) -> int:
        """Consume one batch of incident records, plan their deliveries, commit; returns the records handled."""
        messages = self.consumer.consume(POLL_BATCH, timeout=POLL_TIMEOUT_S)
        for msg in messages:
            if msg.error():
                self.stats["kafka_errors"] += 1
                log.warning("kafka: %s", msg.error())
                continue
            try:
                incident = check_incident(load_object(msg.value()))
                problem = verify_record(incident, self.signing_key)
                if problem:  # a forged state would page someone, or resolve a real incident
                    raise InvalidMessage(problem, incident["device_id"])
            except InvalidMessage as exc:
                self.stats["incidents_invalid"] += 1
                self.db.write_dead_letters([dead_letter_record(
                    msg.value(), f"incident: {exc.reason}", self.topic, exc.device_id, self.clock())])
                continue
            self.stats["incidents"] += 1
            self.plan(incident)
        if messages:
            self.consumer.commit(asynchronous=False)
        return len(messages)

    def plan(self, incident: dict) -> list[str]:
        """Write the deliveries of one incident state (one per receiver); returns the ids that were new."""
        now, status, new = self.clock(), incident["status"], []
        rule = matching_rule(incident, self.rules())
        unconfirmed = not worth_notifying(incident, self.router.notify_min_flagged, self.router.critical_ratio)
        held_back = False
        for receiver in self.receivers:
            opening_id = delivery_id(receiver.id, incident["incident_id"], "open")
            opening = self.store.get(opening_id)
            if unconfirmed and opening is None:  # not (yet) worth a page: a later state of it may be
                held_back = True
                continue
            if status == "open" and opening is not None:
                self.store.refresh_incident(opening_id, incident, now)  # the incident grew: a replay or an update
                continue
            suppressed_by = rule["_id"] if rule else None
            if opening is not None and opening["state"] == SUPPRESSED:  # its opening was not sent: nor is this
                suppressed_by = opening.get("suppressed_by")
            labels = None
            if receiver.kind == ALERTMANAGER:
                labels = (opening or {}).get("labels") or alert_labels(incident, self.router.critical_ratio)
            doc = {"_id": delivery_id(receiver.id, incident["incident_id"], status), "receiver": receiver.id,
                   "kind": receiver.kind, "url": receiver.url, "incident_id": incident["incident_id"],
                   "device_id": incident["device_id"], "status": status,
                   "state": SUPPRESSED if suppressed_by is not None else PENDING, "attempts": 0,
                   "next_attempt_at": now, "lease_until": 0, "created_at": now, "updated_at": now,
                   "delivered_at": None, "last_error": None, "incident": incident, "labels": labels,
                   "suppressed_by": suppressed_by, "resolved": status == "resolved", "resend_at": None}
            if self.store.add(doc):
                new.append(doc["_id"])
                self.stats["suppressed" if suppressed_by is not None else "planned"] += 1
            if status == "resolved" and opening is not None:
                self.store.mark_resolved(opening_id, now)
        if held_back:
            self.stats["held_back"] += 1
        return new

    # -- (2) sending ----------------------------------------------------------------------------------------------

    def deliver_due(self, limit: int = SEND_BATCH) -> int:
        """Send up to `limit` due deliveries, oldest first; returns how many attempts were made."""
        attempts = 0
        lease_ms = int((self.router.timeout_s * 2 + 5) * 1000)
        while attempts < limit:
            batch = self.store.due(self.clock(), limit - attempts)
            tried = attempts
            for key in batch:  # claimed one at a time, just before it is sent: the lease covers one send
                now = self.clock()
                delivery = self.store.claim(key, now, lease_ms)
                if delivery is None:
                    continue
                receiver = self.by_id.get(delivery["receiver"])
                if receiver is None:  # configured before, not any more: leave it for when it comes back
                    self.store.postpone(delivery["_id"], now + int(self.router.backoff_max_s * 1000))
                    self.stats["receiver_gone"] += 1
                    continue
                if delivery["status"] == "resolved":
                    opening = self.store.get(delivery_id(receiver.id, delivery["incident_id"], "open"))
                    if opening is not None and opening["state"] == PENDING:  # resolutions follow their opening
                        self.store.postpone(delivery["_id"], max(opening["next_attempt_at"], now) + 1)
                        continue
                attempts += 1
                self.attempt(receiver, delivery)
            if attempts == tried:  # nothing due, or nothing in the batch could be sent yet
                break
        return attempts

    def attempt(self, receiver: HttpReceiver, delivery: dict) -> None:
        outcome = receiver.send(delivery, self.clock())
        now = self.clock()
        if outcome.ok:
            resend_at = None
            if receiver.kind == ALERTMANAGER and delivery["status"] == "open" and not delivery.get("resolved"):
                resend_at = now + int(self.router.resend_interval_s * 1000)
            self.store.delivered(delivery, now, resend_at)
            self.stats["delivered"] += 1
            return
        attempt = delivery["attempts"] + 1
        self.stats["failed_attempts"] += 1
        if outcome.retry and attempt < self.router.max_attempts:
            delay = backoff_delay_s(attempt, self.router.backoff_initial_s, self.router.backoff_factor,
                                    self.router.backoff_max_s, self.router.backoff_jitter, self.uniform())
            if outcome.retry_after_s is not None:
                delay = max(delay, min(outcome.retry_after_s, self.router.backoff_max_s))
            self.store.failed(delivery, now, outcome.error or "failed", now + int(delay * 1000))
            return
        self.store.failed(delivery, now, outcome.error or "failed", None)
        self.stats["dead"] += 1
        why = f"failed after {attempt} attempts" if outcome.retry else "was refused"
        log.warning("delivery %s is dead (%s): %s", delivery["_id"], why, outcome.error)
        raw = json.dumps({"delivery_id": delivery["_id"], "incident": delivery["incident"]}, default=str)
        self.db.write_dead_letters([dead_letter_record(
            raw, f"delivery to {receiver.kind} {receiver.url} {why}: {outcome.error}", f"router:{receiver.kind}",
            delivery["device_id"], now)])

    def resend_open(self) -> int:
        """Re-send open incidents to Alertmanager receivers (keeps them firing there); returns how many were sent."""
        sent = 0
        for delivery in self.store.due_resends(self.clock()):
            receiver = self.by_id.get(delivery["receiver"])
            if receiver is None:
                continue
            outcome = receiver.send(delivery, self.clock())
            now = self.clock()
            self.store.resent(delivery["_id"], now, now + int(self.router.resend_interval_s * 1000),
                              None if outcome.ok else outcome.error)
            sent += outcome.ok
            self.stats["resent" if outcome.ok else "resend_failed"] += 1
        return sent

    # -- the service ----------------------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One turn: poll, send, re-send; returns the work done (0 = idle)."""
        return self.poll_once() + self.deliver_due() + self.resend_open()

    def run(self, should_stop: Callable[[], bool] = lambda: False, until_idle_s: float | None = None,
            progress: Callable[[str], None] | None = None, progress_every_s: float = 10.0) -> Counter:
        """Run until `should_stop()`, or until nothing happened for `until_idle_s` seconds with nothing pending."""
        last_work = last_report = time.monotonic()
        try:
            while not should_stop():
                if self.run_once():
                    last_work = time.monotonic()
                else:
                    if (until_idle_s is not None and time.monotonic() - last_work >= until_idle_s
                            and not self.pending()):
                        break
                    time.sleep(self.router.idle_sleep_s)
                if progress and time.monotonic() - last_report >= progress_every_s:
                    progress(self.describe())
                    last_report = time.monotonic()
        finally:
            self.close()
        return self.stats

    def pending(self) -> int:
        return self.db.collection("deliveries").count_documents({"state": PENDING})

    def close(self) -> None:
        self.consumer.close()
        self.db.close()

    def describe(self) -> str:
        return "router: " + (", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())) or "idle")


def retry_dead(cfg: Config) -> int:
    """Make dead deliveries pending again (`flead router retry-dead`); returns how many."""
    db = Store(cfg)
    try:
        return DeliveryStore(db, cfg).retry_dead(now_ms())
    finally:
        db.close()

