"""The stream job's decisions for one device, without Flink: parse, micro-batch, adopt, score then learn, emit.

`StreamScoring` is created once per job with the detector settings and the `stream` options, shipped to every
Python worker, and called by the Flink operator (`flink_jobs.anomaly_job.DeviceScorer`) from its callbacks:

    columns = scoring.parse(message, key)              # or InvalidMessage -> scoring.refused(...)
    step = scoring.buffer(buffered, columns, lag, state)  # what to score now, what to keep, whether to set timers
    state, emitted = scoring.score(state, device_id, batches, broadcasts, now_ms)
    entry, emitted = scoring.receive_broadcast(value, broadcasts, report)

Everything the operator sends on is in `Emitted`: the main output (one `flead.scores/1` record per micro-batch)
and the side outputs, plus counter increments by name (`COUNTERS`).

Trust: telemetry is taken only signed with its device's token (`models.integrity.device_message_problem`;
unsigned too with `ingest.require_signed_telemetry` off); score batches, alerts, snapshots, incidents and drift
events leave signed (`models.integrity`, the deployment's key, which the operator hands in with `use_key` and which
never travels with the job); global models, cohort announcements and operators' feedback are
taken only when their signature verifies, and a global model only under `global_model_verdict` (issued by the
aggregator, newer, building on a version the worker has seen).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import numpy as np

from models import secure_aggregation as secagg
from models.detector import DetectionResult, DetectorSettings, DeviceDetector
from models.features import NonFiniteMetricError
from models.integrity import device_message_problem, global_model_verdict, sign_message, sign_record, verify_record
from models.serialization import to_b64
from models.updates import codec_for
from scoring.broadcasts import FLEET, Broadcasts, global_model_of, model_entry
from scoring.feedback import FeedbackSettings, MutePattern, apply_feedback, mute_mask
from scoring.state import DeviceState
from models.incidents import STUCK, incident_id
from telemetry.schema import (DRIFT, FEEDBACK_SCHEMA, GLOBAL_MODEL, GLOBAL_MODEL_SCHEMA, INCIDENT, SNAPSHOT, Columns,
                              InvalidMessage, check_feedback, dead_letter_record, decode_columns, dumps_json,
                              encode_scores, load_object)

COUNTERS = ("records_scored", "anomalies", "dead_letters", "values_imputed", "metric_values_ignored", "snapshots",
            "global_models_adopted", "global_models_rejected", "duplicates_dropped", "timestamps_refused",
            "feedback_applied", "broadcasts_rejected", "anomalies_muted", "incidents_opened", "drift_events",
            "values_winsorised", "devices_reconfigured", "telemetry_refused", "scoring_errors", "records_too_large",
            "snapshots_rank_bound", "stuck_flags")
"""Names of the counters `Emitted.counts` increments (the operator registers one Flink counter per name)."""


@dataclass(frozen=True)
class StreamOptions:
    """The `stream.*` settings the per-device logic uses, and the topics it names in dead letters."""

    micro_batch_size: int
    backlog_micro_batch_size: int  # readings per micro-batch at most while behind (`batch_size`)
    backlog_lag_ms: int  # a message this long from Kafka to the scorer means the job is behind
    backlog_max_share: float  # a backlog micro-batch holds at most this share of the readings the model learned
    timestamp_window_ms: int  # 0: any event time is accepted (replays)
    snapshot_every: int
    snapshot_interval_ms: int
    telemetry_topic: str
    global_model_topic: str
    feedback_topic: str
    max_version_gap: int  # integrity.max_version_gap
    secure_aggregation: bool  # privacy.secure_aggregation: snapshots answer cohorts with masked vectors
    feedback: FeedbackSettings
    require_signed_telemetry: bool  # ingest.require_signed_telemetry: unsigned telemetry is refused
    max_record_bytes: int  # kafka.max_message_bytes: a larger record is not emitted (the producer would fail the job)

    @classmethod
    def from_config(cls, cfg: Any) -> "StreamOptions":
        stream, topics = cfg.stream, cfg.kafka.topics
        return cls(micro_batch_size=stream.micro_batch_size,
                   backlog_micro_batch_size=stream.backlog_micro_batch_size, backlog_lag_ms=stream.backlog_lag_ms,
                   backlog_max_share=stream.backlog_max_share, timestamp_window_ms=stream.timestamp_window_s * 1000,
                   snapshot_every=stream.snapshot_every,
                   snapshot_interval_ms=stream.snapshot_interval_s * 1000, telemetry_topic=topics.telemetry,
                   global_model_topic=topics.global_model, feedback_topic=topics.feedback,
                   max_version_gap=cfg.integrity.max_version_gap, secure_aggregation=cfg.privacy.secure_aggregation,
                   feedback=FeedbackSettings.from_config(cfg),
                   require_signed_telemetry=cfg.ingest.require_signed_telemetry,
                   max_record_bytes=cfg.kafka.max_message_bytes)

    def __post_init__(self):
        if self.backlog_micro_batch_size < self.micro_batch_size:
            raise ValueError(f"stream.backlog_micro_batch_size ({self.backlog_micro_batch_size}) must be at least "
                             f"stream.micro_batch_size ({self.micro_batch_size}); equal turns backlog batching off")
        if not 0 < self.backlog_max_share <= 1:
            raise ValueError(f"stream.backlog_max_share ({self.backlog_max_share}) must be in (0, 1]")


@dataclass
class Emitted:
    """What one callback sends on: records per output (UTF-8 JSON) and counter increments."""

    scores: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    incidents: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


UNSIGNED_HINT = (" (devices sign telemetry with their token, docs/contracts.md; ingest.require_signed_telemetry: "
                 "false accepts unsigned messages)")


class UnsignedTelemetry(InvalidMessage):
    """A telemetry message without a valid signature of its device's token."""


class Buffering(NamedTuple):
    """`StreamScoring.buffer`'s decision: ``ready`` batches to score now (or None), what stays ``buffered`` (or
    None: clear the buffer), and whether a new buffer was started (the operator then sets its flush timers)."""

    ready: list[Columns] | None
    buffered: list[Columns] | None
    started: bool


def to_json(record: Mapping) -> str:
    """Compact JSON, non-finite floats as null."""
    return dumps_json(record).decode()


class StreamScoring:
    """The per-device logic of the stream job (module docstring). Holds no device state itself, only what a
    worker remembers so as not to repeat itself (refused global models, reported unknown metric sets, devices'
    mute patterns derived from the feedback it holds), one entry of each per device at most, so a device cannot
    grow it, and the signing key (`use_key`)."""

    def __init__(self, settings: DetectorSettings, options: StreamOptions):
        self.settings = settings
        self._tunable = settings.tunable()
        self.options = options
        self.key: bytes | None = None
        self.refused_global: dict[str, int] = {}  # device -> the newest global version whose shapes did not fit it
        self.reported_refusal = -1  # the global version last dead-lettered as not fitting (a letter per version)
        self.reported_unknown: dict[str, tuple[str, ...]] = {}  # device -> the unknown metric names last reported
        self.patterns: dict[str, tuple[tuple, tuple[MutePattern, ...]]] = {}  # device -> (feedback seen, patterns)

    def use_key(self, key: bytes) -> "StreamScoring":
        """The deployment's signing key (`models.integrity.signing_key`): snapshots are signed with it, broadcasts
        verified. Set in each worker, never shipped with the job."""
        self.key = key
        return self

    def __getstate__(self):  # shipped to the workers: what they remember starts empty, the key stays behind
        return {"settings": self.settings, "options": self.options}

    def __setstate__(self, values):
        self.__init__(values["settings"], values["options"])

    # -- input -----------------------------------------------------------------------------------------------

    def parse(self, message: bytes | None, key: str) -> Columns:
        """The message as columns; `InvalidMessage` if it breaks the contract or is not the keyed device's, and
        `UnsignedTelemetry` (before it is decoded) if it is not signed with the token of the device it is keyed
        by (`ingest.require_signed_telemetry`), so a forged message can neither take a device's seqs nor create
        state for a made-up device."""
        if message is not None and key:  # no key: the message names no device, which decoding refuses
            problem = device_message_problem(message, self._require_key(), key, self.options.require_signed_telemetry)
            if problem:
                raise UnsignedTelemetry(problem + (UNSIGNED_HINT if problem.startswith("unsigned") else ""), key)
        columns = decode_columns(message)
        if columns.device_id != key:
            raise InvalidMessage(f"device_id {columns.device_id!r} under the Kafka key {key!r}", columns.device_id)
        return columns

    def refused(self, message: bytes | None, error: InvalidMessage) -> Emitted:
        """A telemetry message `parse` refused, as a dead letter with the reason (counted in ``telemetry_refused``
        too when its signature was the problem)."""
        out = Emitted()
        if isinstance(error, UnsignedTelemetry):
            out.counts["telemetry_refused"] += 1
        self._dead_letter(out, message, error.reason, self.options.telemetry_topic, error.device_id)
        return out

    def buffer(self, buffered: list[Columns] | None, columns: Columns, lag_ms: int = 0,
               state: DeviceState | None = None) -> Buffering:
        """Add a device's message to its micro-batch buffer: score once `batch_size` readings are together (a
        message that is a micro-batch already is scored at once, without buffering)."""
        size = self.batch_size(lag_ms, state)
        if buffered is None:
            if len(columns.seqs) >= size:
                return Buffering([columns], None, False)
            return Buffering(None, [columns], True)
        buffered = [*buffered, columns]
        if sum(len(batch.seqs) for batch in buffered) >= size:
            return Buffering(buffered, None, False)
        return Buffering(None, buffered, False)

    def batch_size(self, lag_ms: int, state: DeviceState | None) -> int:
        """Readings per micro-batch for a message that took `lag_ms` from Kafka to the scorer: `micro_batch_size`;
        at `backlog_lag_ms` or more the job is behind and more of the device's messages are queued, so up to
        `backlog_micro_batch_size` (cheaper per reading: the job catches up faster), but

        - at most `backlog_max_share` of the readings the device's model has learned: a batch is scored against the
          model as it was before the batch, and a young model still moves fast (a new device scored in batches of
          128 from its first reading flagged 8 % of its first 1,000 readings after warm-up instead of ~1 %, and
          could set off drift re-baselining); and
        - not past the device's next weight snapshot (snapshots, and so federated rounds, keep their cadence).

        A message on time scores whatever is buffered at the usual size: a caught-up job is back to small batches
        at once. Never below `micro_batch_size`."""
        options = self.options
        if lag_ms < options.backlog_lag_ms or state is None:
            return options.micro_batch_size
        learned = state.detector.n_seen
        size = min(options.backlog_micro_batch_size, int(learned * options.backlog_max_share))
        until_snapshot = options.snapshot_every - (learned - state.n_seen_at_snapshot)
        if until_snapshot > 0:  # else overdue (a secure round answered): no snapshot to wait for
            size = min(size, until_snapshot)
        return max(options.micro_batch_size, size)

    # -- broadcasts: global models, cohorts, feedback ---------------------------------------------------------

    def receive_broadcast(self, value: bytes | str, broadcasts: Broadcasts, report: bool
                          ) -> tuple[tuple[str, Any] | None, Emitted]:
        """Take a record of the broadcast topics (global models and cohort announcements, operators' feedback):
        the broadcast-state entry to checkpoint if the worker keeps it, else None. A refused record is counted, and
        dead-lettered with the reason when `report` (every worker sees every record: one of them reports)."""
        out = Emitted()
        schema = None
        try:
            record = load_object(value)
            schema = record.get("schema")
            if schema == GLOBAL_MODEL_SCHEMA:
                return self._keep_global_model(GLOBAL_MODEL.check(record), broadcasts), out
            problem = verify_record(record, self._require_key())
            if problem:
                raise InvalidMessage(problem)
            if schema == FEEDBACK_SCHEMA:
                return broadcasts.keep_feedback(check_feedback(record)), out
            if schema == secagg.COHORT_SCHEMA:
                return broadcasts.keep_cohort(record), out
            raise InvalidMessage(f"schema {schema!r} is none of {GLOBAL_MODEL_SCHEMA}, {secagg.COHORT_SCHEMA}, "
                                 f"{FEEDBACK_SCHEMA}")
        except InvalidMessage as exc:
            out.counts["global_models_rejected" if schema == GLOBAL_MODEL_SCHEMA else "broadcasts_rejected"] += 1
            if report:
                source = (self.options.feedback_topic if schema == FEEDBACK_SCHEMA
                          else self.options.global_model_topic)
                self._dead_letter(out, value, f"broadcast refused: {exc.reason}", source)
            return None, out

    def _keep_global_model(self, record: dict, broadcasts: Broadcasts) -> tuple[str, Any] | None:
        cluster = FLEET if record.get("cluster") is None else str(record["cluster"])
        models = broadcasts.models
        held = models.held_version(cluster)
        further_part = cluster != FLEET and record["version"] == held  # more members of the cluster model held
        if record["version"] < held or (record["version"] == held and not further_part):
            return None  # not newer than what the worker holds (e.g. the topic read again after a restart)
        verdict = global_model_verdict(record, self._require_key(), held - 1 if further_part else held,
                                       models.newest_version(), self.options.max_version_gap)
        if not verdict.adopt:
            raise InvalidMessage(verdict.reason)
        cluster, model = global_model_of(record)
        return model_entry(cluster, model) if models.offer(cluster, model) else None

    def adopt_newest(self, broadcasts: Broadcasts, device_id: str, detector: DeviceDetector, out: Emitted) -> None:
        """Adopt the device's newest global model if it is newer than the one it has (`stream.global_policy`).
        A model whose shapes do not fit the device's is refused once and not retried."""
        newest = broadcasts.models.newest_for(device_id)
        if (newest is None or newest.version <= detector.global_version
                or newest.version <= self.refused_global.get(device_id, -1)):
            return
        try:
            detector.adopt_global(newest.weights, newest.version)
            out.counts["global_models_adopted"] += 1
        except ValueError as exc:  # shapes of another architecture
            out.counts["global_models_rejected"] += 1
            if newest.version != self.reported_refusal:  # once per version, not once per device
                self._dead_letter(out, None, f"global model v{newest.version} does not fit the model of device "
                                             f"{device_id} (and maybe others): {exc}",
                                  self.options.global_model_topic, device_id)
            self.reported_refusal = newest.version
            self.refused_global[device_id] = newest.version

    def mute_patterns(self, broadcasts: Broadcasts, device_id: str, out: Emitted) -> tuple[MutePattern, ...]:
        """The device's false-positive patterns (`scoring.feedback`), derived from the verdicts the worker holds
        (recomputed only when they change)."""
        verdicts = broadcasts.feedback_for(device_id)
        if not verdicts:
            return ()
        seen = tuple((v["incident_id"], v["created_at"]) for v in verdicts)
        held = self.patterns.get(device_id)
        if held is not None and held[0] == seen:
            return held[1]
        patterns: tuple[MutePattern, ...] = ()
        for verdict in verdicts:
            patterns = apply_feedback(patterns, verdict, self.options.feedback)
        out.counts["feedback_applied"] += len(seen) - (0 if held is None else len(set(seen) & set(held[0])))
        self.patterns[device_id] = (seen, patterns)
        return patterns

    def _require_key(self) -> bytes:
        if self.key is None:
            raise RuntimeError("StreamScoring.use_key was not called: the worker has no signing key")
        return self.key

    # -- scoring ---------------------------------------------------------------------------------------------

    def score(self, state: DeviceState | None, device_id: str, batches: list[Columns], broadcasts: Broadcasts,
              now_ms: int) -> tuple[DeviceState, Emitted]:
        """Score then learn a device's micro-batch (one or more messages), after adopting its newest global model;
        the score records, alerts and, when due, a weight snapshot. A device's model is built on the metrics of
        its first message."""
        out = Emitted()
        if state is None:
            state = DeviceState(DeviceDetector(list(batches[0].names), self.settings), now_ms)
        detector = state.detector
        if detector.settings.tunable() != self._tunable:   # state made under another configuration
            detector.reconfigure(self.settings)
            out.counts["devices_reconfigured"] += 1
        self.adopt_newest(broadcasts, device_id, detector, out)
        X = np.concatenate([self.model_columns(detector, batch) for batch in batches])
        for batch in batches:
            self.report_unknown_metrics(device_id, detector, batch, out)
        seqs = [s for batch in batches for s in batch.seqs]
        stamps = [t for batch in batches for t in batch.ts]
        labels = [label for batch in batches for label in batch.labels]
        admitted = self.admit(state, device_id, seqs, stamps, now_ms, out)
        if not admitted.all():
            X = X[admitted]
            seqs, stamps, labels = ([v for v, keep in zip(column, admitted.tolist()) if keep]
                                    for column in (seqs, stamps, labels))
            if not seqs:
                return state, out
        state.last_seq = max(state.last_seq, seqs[-1])
        patterns = self.mute_patterns(broadcasts, device_id, out)
        mute = None
        if patterns:
            def mute(scores, thresholds, is_anomaly, top_metrics):
                return mute_mask(patterns, scores, thresholds, is_anomaly, top_metrics, now_ms, self.options.feedback)
        incidents_before, winsorised_before = detector.n_incidents, detector.n_winsorised
        try:
            processed = self._process(detector, device_id, X, seqs, stamps, labels, mute, out)
        except Exception as exc:  # noqa: BLE001 - a poison batch: see `scoring_failed`
            self.scoring_failed(device_id, seqs, exc, out)
            return state, out
        for rows, result in processed:
            self.score_records(device_id, detector, seqs[rows], stamps[rows], labels[rows], result, now_ms, out)
            self.event_records(device_id, detector, result, now_ms, out)
        out.counts["incidents_opened"] += detector.n_incidents - incidents_before
        out.counts["values_winsorised"] += detector.n_winsorised - winsorised_before
        if state.snapshot_due(now_ms, self.options.snapshot_every, self.options.snapshot_interval_ms):
            self.snapshot(state, device_id, broadcasts, now_ms, out)
        return state, out

    def scoring_failed(self, device_id: str, seqs: list[int], exc: Exception, out: Emitted) -> None:
        """A batch the detector raised on (a defect, or input no check foresaw) is dead-lettered with the error and
        counted (``scoring_errors``) instead of failing the job: a failed job restarts from its checkpoint and meets
        the same batch again, so one poison batch would stop every device's scoring. The device's later batches
        are scored as usual."""
        out.counts["scoring_errors"] += 1
        first = {"device_id": device_id, "seq_first": seqs[0], "seq_last": seqs[-1], "readings": len(seqs)}
        self._dead_letter(out, to_json(first), f"scoring failed, batch not scored ({type(exc).__name__}: {exc})",
                          self.options.telemetry_topic, device_id)

    def admit(self, state: DeviceState, device_id: str, seqs: list[int], stamps: list[int], now_ms: int,
              out: Emitted) -> np.ndarray:
        """Which readings to score: not duplicates (a ``seq`` at or below the highest the device has scored, e.g. a
        producer's retry or a replay; counted, not dead-lettered) and, with `stream.timestamp_window_s`, an event
        time within that window of now (refused ones are counted and dead-lettered, one letter per batch)."""
        seq = np.asarray(seqs, dtype=np.int64)
        highest_before = np.maximum.accumulate(np.concatenate(([state.last_seq], seq[:-1])))
        admitted = seq > highest_before
        out.counts["duplicates_dropped"] += int(admitted.size - np.count_nonzero(admitted))
        window = self.options.timestamp_window_ms
        if window:
            outside = admitted & (np.abs(np.asarray(stamps, dtype=np.int64) - now_ms) > window)
            if outside.any():
                first = int(np.argmax(outside))
                n = int(np.count_nonzero(outside))
                out.counts["timestamps_refused"] += n
                reason = (f"{n} reading(s) with an event time more than stream.timestamp_window_s = "
                          f"{window // 1000} s from now (first: seq {seqs[first]}, ts {stamps[first]}); "
                          f"set it to 0 to replay recorded data")
                self._dead_letter(out, to_json({"device_id": device_id, "seq": seqs[first], "ts": stamps[first]}),
                                  reason, self.options.telemetry_topic, device_id)
                admitted &= ~outside
        return admitted

    def _process(self, detector: DeviceDetector, device_id: str, X: np.ndarray, seqs, stamps, labels, mute,
                 out: Emitted) -> list[tuple[slice, DetectionResult]]:
        """`process_many` of the batch; under ``model.nan_policy: reject`` a batch with a missing value is scored
        reading by reading and the readings with one are dead-lettered."""
        try:
            return [(slice(None), detector.process_many(X, seqs, stamps, mute))]
        except NonFiniteMetricError:
            pass
        results = []
        for i in range(X.shape[0]):
            try:
                results.append((slice(i, i + 1), detector.process_many(X[i:i + 1], seqs[i:i + 1], stamps[i:i + 1],
                                                                       mute)))
            except NonFiniteMetricError as exc:
                raw = {"device_id": device_id, "seq": seqs[i], "ts": stamps[i],
                       "metrics": dict(zip(detector.metric_names, X[i].tolist())), "label": labels[i]}
                self._dead_letter(out, to_json(raw), str(exc), self.options.telemetry_topic, device_id)
        return results

    @staticmethod
    def model_columns(detector: DeviceDetector, batch: Columns) -> np.ndarray:
        """The batch's values in the detector's metric order (a metric the message lacks is missing: nan, imputed
        and counted by the detector; one the model does not know is left out: `report_unknown_metrics`)."""
        if list(batch.names) == detector.metric_names:
            return batch.X
        position = {name: i for i, name in enumerate(batch.names)}
        out = np.full((batch.X.shape[0], len(detector.metric_names)), math.nan)
        for j, name in enumerate(detector.metric_names):
            if name in position:
                out[:, j] = batch.X[:, position[name]]
        return out

    def report_unknown_metrics(self, device_id: str, detector: DeviceDetector, batch: Columns, out: Emitted) -> None:
        """Metrics the device's model was not created with cannot be scored: their values are counted
        (``metric_values_ignored``), and the first message of a device bringing another such set than the last
        one reported is dead-lettered with the reason (a device that keeps sending the same extra metrics does not
        flood the topic; the worker remembers one set per device, so a device that sends new names in every message
        cannot grow its memory, and gets a dead letter per message)."""
        if list(batch.names) == detector.metric_names:
            return
        unknown = tuple(sorted(set(batch.names) - set(detector.metric_names)))
        if not unknown:
            return
        out.counts["metric_values_ignored"] += len(unknown) * len(batch.seqs)
        if self.reported_unknown.get(device_id) == unknown:
            return
        self.reported_unknown[device_id] = unknown
        reason = (f"metrics {', '.join(unknown)} are not in the device's model (created with "
                  f"{len(detector.metric_names)} metrics): their values are ignored, the others scored")
        first = {"device_id": device_id, "seq": batch.seqs[0], "ts": batch.ts[0],
                 "metrics": dict(zip(batch.names, batch.X[0].tolist()))}
        self._dead_letter(out, to_json(first), reason, self.options.telemetry_topic, device_id)

    def score_records(self, device_id: str, detector: DeviceDetector, seqs, stamps, labels, result: DetectionResult,
                      scored_at: int, out: Emitted) -> None:
        """One `flead.scores/1` batch of the micro-batch's score records (one Kafka record: per-record costs in
        Beam, the JVM and the broker dominate); each anomaly also as an alert. Both signed (`sign_message`): the
        sink stores a reading's score once, so a forged batch sent first would otherwise hide the genuine one."""
        key = self._require_key()
        out.counts["records_scored"] += len(seqs)
        out.counts["values_imputed"] += result.n_imputed
        out.counts["anomalies_muted"] += result.n_muted
        model_version, global_version = detector.model_version, detector.global_version
        incident_ids = [None if start < 0 else incident_id(device_id, start) for start in result.incident_starts.tolist()]
        if result.stuck_incident_starts.size:  # a reading flagged only for stuck metrics links to their incident
            incident_ids = [incident_id(device_id, stuck, STUCK) if known is None and stuck >= 0 else known
                            for known, stuck in zip(incident_ids, result.stuck_incident_starts.tolist())]
        scores = [{"seq": seq, "ts": ts, "score": score, "threshold": threshold, "is_anomaly": anomaly,
                   "p_value": p_value, "top_metrics": [{"metric": m, "share": share} for m, share in top],
                   "incident_id": incident, "label": label}
                  for seq, ts, score, threshold, anomaly, p_value, top, incident, label in zip(
                      seqs, stamps, result.scores.tolist(), result.thresholds.tolist(), result.is_anomaly.tolist(),
                      result.p_values.tolist(), result.top_metrics, incident_ids, labels)]
        out.scores.append(sign_message(encode_scores(device_id, model_version, global_version, scored_at, scores),
                                       key).decode())
        for record, stuck in zip(scores, result.stuck_metrics or [[]] * len(scores)):
            if record["is_anomaly"]:
                out.counts["anomalies"] += 1
                alert = {"device_id": device_id, **record, "model_version": model_version,
                         "global_version": global_version, "scored_at": scored_at}
                if stuck:  # flagged (also) because metrics stopped moving (models.stuck)
                    out.counts["stuck_flags"] += 1
                    alert["stuck_metrics"] = [{"metric": m, "repeats": repeats, "usual": usual}
                                              for m, repeats, usual in stuck]
                out.alerts.append(sign_message(dumps_json(alert), key).decode())

    def event_records(self, device_id: str, detector: DeviceDetector, result: DetectionResult, scored_at: int,
                      out: Emitted) -> None:
        """The incidents that opened, grew or resolved in the batch (`flead.incident/1`) and a drift event
        (`flead.drift/1`) if the device re-baselined, signed: the sink and the incident router take no other."""
        if not result.incidents and result.drift is None:
            return
        key = self._require_key()
        for incident in result.incidents:
            out.incidents.append(to_json(sign_record(INCIDENT.make(**incident.record_fields(device_id, scored_at)),
                                                     key)))
        if result.drift is not None:
            out.counts["drift_events"] += 1
            out.drift.append(to_json(sign_record(DRIFT.make(**result.drift.record_fields(
                device_id, scored_at, detector.model_version)), key)))

    def snapshot(self, state: DeviceState, device_id: str, broadcasts: Broadcasts, now_ms: int, out: Emitted) -> None:
        """A signed `flead.snapshot/1` record of the device's federated weights; with secure aggregation, its
        answers to the aggregator's cohort instead (`secure_records`), and nothing while the device has answered
        the current round (its readings then count towards the next answer)."""
        if self.options.secure_aggregation and self.secure_round_answered(state, device_id, broadcasts):
            return
        snap = state.take_snapshot(now_ms)
        detector = state.detector
        if detector.rank_bound:  # k capped by model.subspace.rank: the model scores more variance than the rule says
            out.counts["snapshots_rank_bound"] += 1
        if self.options.secure_aggregation:
            records = self.secure_records(state, device_id, snap, broadcasts, now_ms)
        else:
            loss = snap["loss"]
            records = [SNAPSHOT.make(
                device_id=device_id, version=snap["version"], global_version=snap["global_version"],
                n_samples=snap["n_samples"], n_seen=detector.n_seen,
                loss=None if loss is None or not math.isfinite(loss) else float(loss),
                weights=to_b64(snap["weights"]), created_at=now_ms)]
        key = self._require_key()
        for record in records:
            signed = to_json(sign_record(record, key))
            size = len(signed.encode())
            if size > self.options.max_record_bytes:  # Kafka's producer would fail the job, again after each restart
                out.counts["records_too_large"] += 1
                self._dead_letter(out, to_json({"device_id": device_id, "version": record["version"], "bytes": size}),
                                  f"snapshot not sent: {size:,} bytes, more than kafka.max_message_bytes "
                                  f"({self.options.max_record_bytes:,}); the device's model is too wide to federate "
                                  "and keeps learning on its own", self.options.telemetry_topic, device_id)
                continue
            out.counts["snapshots"] += 1
            out.snapshots.append(signed)

    @staticmethod
    def secure_round_answered(state: DeviceState, device_id: str, broadcasts: Broadcasts) -> bool:
        """Whether the device has sent everything the newest cohort asks of it."""
        cohort = broadcasts.cohort
        if cohort is None or state.secure_public is None:
            return False
        listed = cohort.get("members", {}).get(device_id) == secagg.public_key_b64(state.secure_public)
        round_id = cohort["round_id"]
        return (listed and state.answered_round == round_id
                and (not cohort.get("dropped") or state.revealed_round == round_id))

    @staticmethod
    def secure_records(state: DeviceState, device_id: str, snap: dict, broadcasts: Broadcasts, now_ms: int
                       ) -> list[dict]:
        """Secure aggregation, device side (`models.secure_aggregation`): the masked answer to the newest cohort
        that lists the device under its current public key (once per round), and the pair seeds with its dropped
        members when the aggregator asks (once); else an enrolment that announces the device's key and layout.
        The plain weights never leave the device."""
        detector = state.detector
        private, public = state.secure_keys()
        version, n_seen = snap["version"], detector.n_seen
        cohort = broadcasts.cohort
        if cohort is None or cohort.get("members", {}).get(device_id) != secagg.public_key_b64(public):
            weights = detector.get_weights()
            vector = codec_for(detector.architecture).federated_vector(weights)
            return [secagg.enrolment_record(device_id, public, vector.size, [w.shape for w in weights], version,
                                            n_seen, now_ms, detector.architecture)]
        records = []
        round_id = cohort["round_id"]
        if state.answered_round != round_id:
            vector = codec_for(detector.architecture).federated_vector(detector.get_weights())
            answer = secagg.answer_cohort(cohort, device_id, private, vector, snap["n_samples"], version, n_seen,
                                          now_ms)
            if answer is not None:  # None: declared dropped (its pair seeds are revealed): it must stay silent
                records.append(answer)
            state.answered_round = round_id
        if cohort.get("dropped") and state.revealed_round != round_id:
            revealed = secagg.answer_dropouts(cohort, device_id, private, now_ms, version, n_seen)
            if revealed is not None:
                records.append(revealed)
            state.revealed_round = round_id
        return records

    def _dead_letter(self, out: Emitted, raw: bytes | str | None, reason: str, source: str,
                     device_id: str | None = None) -> None:
        """A signed `flead.dead-letter/1` record: the sink stores no other, so a writer of the topic cannot fill the
        data-quality figures with made-up refusals."""
        out.counts["dead_letters"] += 1
        out.dead_letters.append(to_json(sign_record(dead_letter_record(raw, reason, source, device_id),
                                                    self._require_key())))
