"""The stream job's per-device logic (`scoring`), without Flink — and the Flink adapter driven by fakes."""
import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings as examples, strategies as st

from models import secure_aggregation as secagg
from models.detector import DetectorSettings, DeviceDetector
from models.integrity import (AGGREGATOR_ISSUER, sign_device_message, sign_message, sign_record, verify_message,
                              verify_record)
from models.serialization import dumps, from_b64, loads, to_b64
from scoring.broadcasts import (FLEET, Broadcasts, GlobalModel, GlobalModels, global_model_of, holds, member_key,
                                member_keys, model_entry)
from scoring.feedback import FeedbackSettings
from scoring.state import DeviceState, KeyedDevice
from scoring.stream import COUNTERS, Emitted, StreamOptions, StreamScoring
from telemetry.schema import (FEEDBACK, GLOBAL_MODEL, MAX_ABS_VALUE, SNAPSHOT, InvalidMessage, Reading, decode_columns,
                              decode_incident, decode_scores, encode_batch)

METRICS = ["cpu", "mem", "disk"]
KEY = bytes(range(32))
FEEDBACK_SETTINGS = FeedbackSettings(ratio_margin=0.25, min_similarity=0.8, max_patterns=8, expire_days=30)


@pytest.fixture
def settings(cfg_defaults) -> DetectorSettings:
    return DetectorSettings.from_config(cfg_defaults, kind="ae", hidden=(4, 2, 4), warmup=40, history=200)


@pytest.fixture
def cfg_defaults():
    from config import load_config
    return load_config(env={})


def options(**overrides) -> StreamOptions:
    size = overrides.get("micro_batch_size", 4)
    values = dict(micro_batch_size=size, backlog_micro_batch_size=size, backlog_lag_ms=1_000, backlog_max_share=1.0,
                  timestamp_window_ms=0, snapshot_every=50, snapshot_interval_ms=60_000,
                  telemetry_topic="t.telemetry",
                  global_model_topic="t.global", feedback_topic="t.feedback", max_version_gap=10,
                  secure_aggregation=False, feedback=FEEDBACK_SETTINGS, require_signed_telemetry=True,
                  max_record_bytes=10_485_760)
    return StreamOptions(**{**values, **overrides})


def scoring_with(settings, **overrides) -> StreamScoring:
    return StreamScoring(settings, options(**overrides)).use_key(KEY)


def message(device: str, first_seq: int, n: int, values=None, names=METRICS, key=KEY) -> bytes:
    """A telemetry batch as a device sends it: signed with its token (derived from `key`; None: unsigned)."""
    rng = np.random.default_rng(first_seq)
    rows = values if values is not None else rng.normal(0.5, 0.05, size=(n, len(names)))
    encoded = encode_batch(device, [Reading(device, first_seq + i, 1_000 * (first_seq + i),
                                            dict(zip(names, map(float, row))), label=0) for i, row in enumerate(rows)])
    return encoded if key is None else sign_device_message(encoded, key, device)


def columns(device: str, first_seq: int, n: int, **kw):
    return decode_columns(message(device, first_seq, n, **kw))


def model_record(weights, version: int, cluster=None, members=None, key=KEY) -> bytes:
    """A global model as the aggregator publishes it: signed, building on the version before it."""
    record = GLOBAL_MODEL.make(version=version, weights=to_b64(dumps(weights, {"model_version": version})),
                               created_at=0, cluster=cluster, members=members, previous_version=version - 1,
                               issuer=AGGREGATOR_ISSUER)
    return json.dumps(sign_record(record, key)).encode()


def run(scoring: StreamScoring, device: str, n_messages: int, per_message: int = 4, models=None, state=None,
        now=1_000):
    models = models or Broadcasts()
    emitted = []
    for k in range(n_messages):
        state, out = scoring.score(state, device, [columns(device, k * per_message, per_message)], models, now)
        emitted.append(out)
    return state, emitted


# -- parse and buffer ----------------------------------------------------------------------------------------

def test_parse_refuses_a_message_under_another_devices_key(settings):
    scoring = scoring_with(settings)
    assert scoring.parse(message("a", 0, 2), "a").device_id == "a"
    with pytest.raises(InvalidMessage) as err:  # signed by device b, but with a's readings
        scoring.parse(sign_device_message(message("a", 0, 2, key=None), KEY, "b"), "b")
    out = scoring.refused(b"raw", err.value)
    letter = json.loads(out.dead_letters[0])
    assert letter["reason"] == "device_id 'a' under the Kafka key 'b'" and letter["source"] == "t.telemetry"
    assert letter["device_id"] == "a" and out.counts == {"dead_letters": 1}


def test_parse_takes_only_telemetry_signed_with_the_devices_token(settings):
    scoring = scoring_with(settings)
    forged = [("unsigned", message("a", 0, 2, key=None), "unsigned: no 'signature' field (devices sign"),
              ("another key", message("a", 0, 2, key=bytes(32)), "bad signature: the message was altered"),
              ("another device's token", sign_device_message(message("a", 0, 2, key=None), KEY, "b"), "bad sig"),
              ("the deployment key", sign_message(message("a", 0, 2, key=None), KEY), "bad signature"),
              ("altered", message("a", 0, 2).replace(b'"ts":[0,', b'"ts":[9,'), "bad signature"),
              ("garbage", b"not json", "unsigned")]
    for what, raw, reason in forged:
        with pytest.raises(InvalidMessage) as err:
            scoring.parse(raw, "a")
        out = scoring.refused(raw, err.value)
        letter = json.loads(out.dead_letters[0])
        assert letter["reason"].startswith(reason) and letter["device_id"] == "a", what
        assert out.counts == {"dead_letters": 1, "telemetry_refused": 1}, what

    lenient = scoring_with(settings, require_signed_telemetry=False)  # producers from before signing
    assert lenient.parse(message("a", 0, 2, key=None), "a").seqs == [0, 1]
    assert lenient.parse(message("a", 0, 2), "a").seqs == [0, 1]
    with pytest.raises(InvalidMessage, match="bad signature"):  # a bad signature is refused either way
        lenient.parse(message("a", 0, 2, key=bytes(32)), "a")


def test_buffer_scores_full_messages_at_once_and_collects_partial_ones(settings):
    scoring = scoring_with(settings, micro_batch_size=4)
    full, small, other = columns("a", 0, 4), columns("a", 4, 1), columns("a", 5, 2)
    assert scoring.buffer(None, full) == ([full], None, False)
    assert scoring.buffer(None, small) == (None, [small], True)
    assert scoring.buffer([small], other) == (None, [small, other], False)
    step = scoring.buffer([small, other], columns("a", 7, 3))
    assert step.ready is not None and len(step.ready) == 3 and step.buffered is None and not step.started


def test_buffer_gathers_larger_micro_batches_while_the_job_is_behind(settings):
    """A message that reached the scorer `backlog_lag_ms` or more after it entered Kafka is gathered up to
    `backlog_micro_batch_size` readings; the first message on time scores what is buffered at the usual size."""
    scoring = scoring_with(settings, micro_batch_size=4, backlog_micro_batch_size=12, backlog_lag_ms=1_000)
    state, _ = run(scoring, "a", 3)  # 12 readings learned
    full = [columns("a", 12 + 4 * k, 4) for k in range(3)]
    assert scoring.buffer(None, full[0], lag_ms=999, state=state) == ([full[0]], None, False)
    assert scoring.buffer(None, full[0], lag_ms=1_000, state=state) == (None, [full[0]], True)
    assert scoring.buffer([full[0]], full[1], lag_ms=5_000, state=state) == (None, full[:2], False)
    assert scoring.buffer(full[:2], full[2], lag_ms=5_000, state=state) == (full, None, False)  # 12 readings
    assert scoring.buffer(full[:1], full[1], lag_ms=10, state=state) == (full[:2], None, False)  # on time again
    with pytest.raises(ValueError, match="backlog_micro_batch_size"):
        options(micro_batch_size=16, backlog_micro_batch_size=8)
    with pytest.raises(ValueError, match="backlog_max_share"):
        options(backlog_max_share=0)


def test_backlog_micro_batches_stop_at_the_devices_next_snapshot(settings):
    """While behind, a micro-batch grows up to the readings the device still needs for its next weight snapshot
    (never below `micro_batch_size`), so snapshots keep their cadence; one overdue does not hold batches small."""
    scoring = scoring_with(settings, micro_batch_size=4, backlog_micro_batch_size=32, snapshot_every=60)
    state, _ = run(scoring, "a", 10)  # 40 readings learned, 20 to the next snapshot
    assert scoring.batch_size(10, state) == 4 and scoring.batch_size(1_000, state) == 20
    state.n_seen_at_snapshot = state.detector.n_seen - 58  # 2 to go: never below micro_batch_size
    assert scoring.batch_size(1_000, state) == 4
    step = scoring.buffer([columns("a", 40, 2)], columns("a", 42, 2), lag_ms=5_000, state=state)
    assert step.ready is not None and step.buffered is None
    state.n_seen_at_snapshot -= 100  # a snapshot skipped (secure round answered)
    assert scoring.batch_size(1_000, state) == 32


def test_backlog_micro_batches_of_a_young_model_stay_small(settings):
    """A backlog micro-batch holds at most `backlog_max_share` of the readings the device's model learned (a new
    device: `micro_batch_size`), so a model that still moves fast is not scored long after it last learned."""
    scoring = scoring_with(settings, micro_batch_size=4, backlog_micro_batch_size=32, backlog_max_share=0.25,
                           snapshot_every=10_000)
    assert scoring.batch_size(5_000, None) == 4
    for messages, size in ((5, 5), (25, 25), (50, 32)):  # 20 / 100 / 200 readings learned: a quarter, at most 32
        state, _ = run(scoring, "a", messages)
        assert scoring.batch_size(5_000, state) == size


def test_a_young_model_in_a_backlog_raises_no_burst_of_false_alarms(cfg_defaults):
    """The reason for `backlog_max_share`: a new device whose readings all arrive behind (a replay, a restart)
    flags about as many of its first readings after warm-up as one scored in time (the configured share; 8 % of
    the first 1,000 when every micro-batch held 128 readings)."""
    scoring = StreamScoring(DetectorSettings.from_config(cfg_defaults), StreamOptions.from_config(cfg_defaults))
    scoring.use_key(KEY)
    rng = np.random.default_rng(0)
    seqs = np.arange(3_200)
    X = 0.5 + np.outer(np.sin(2 * np.pi * seqs / 40), [0.3, 0.2, 0.1, 0.25]) + rng.normal(0, 0.01, (3_200, 4))
    state, flagged, start = None, [], 0
    while start < len(X):
        n = scoring.batch_size(60_000, state)  # every message a minute behind
        batch = decode_columns(message("a", start, 0, values=X[start:start + n], names=["a", "b", "c", "d"]))
        state, out = scoring.score(state, "a", [batch], Broadcasts(), 1_000)
        flagged += [r["is_anomaly"] for raw in out.scores for r in decode_scores(raw)]
        start += n
    warmup = cfg_defaults.threshold.warmup
    rate = np.mean(flagged[warmup:warmup + 1_000])
    assert rate < 3 * cfg_defaults.threshold.target_false_alarm_rate, rate
    assert state.detector.n_seen == 3_200


def test_backlog_settings_come_from_the_config(cfg_defaults):
    opts = StreamOptions.from_config(cfg_defaults)
    assert opts.backlog_micro_batch_size == cfg_defaults.stream.backlog_micro_batch_size > opts.micro_batch_size
    assert opts.backlog_lag_ms == cfg_defaults.stream.backlog_lag_ms > 0
    assert opts.backlog_max_share == cfg_defaults.stream.backlog_max_share


# -- scoring -------------------------------------------------------------------------------------------------

def test_score_emits_one_scores_record_per_batch_alerts_and_snapshots(settings):
    scoring = scoring_with(settings, snapshot_every=40)
    state, emitted = run(scoring, "a", 30)
    records = [r for out in emitted for raw in out.scores for r in decode_scores(raw)]
    assert [r["seq"] for r in records] == list(range(120)) and all(r["device_id"] == "a" for r in records)
    assert all(len(out.scores) == 1 for out in emitted)
    snapshots = [SNAPSHOT.decode(raw) for out in emitted for raw in out.snapshots]
    assert [s["version"] for s in snapshots] == [1, 2, 3]
    assert [s["n_samples"] for s in snapshots] == [40, 40, 40] and snapshots[-1]["n_seen"] == 120
    weights, _ = loads(from_b64(snapshots[0]["weights"]))
    assert [w.shape for w in weights] == [w.shape for w in state.detector.get_weights()]
    total = sum((out.counts for out in emitted), start=type(emitted[0].counts)())
    assert total["records_scored"] == 120 and total["snapshots"] == 3

    spike = np.tile([0.5, 0.5, 0.5], (4, 1))
    spike[2, 2] = 9.0
    state, out = scoring.score(state, "a", [columns("a", 120, 4, values=spike)], Broadcasts(), 2_000)
    alerts = [json.loads(a) for a in out.alerts]
    assert [a["seq"] for a in alerts] == [122] and alerts[0]["top_metrics"][0]["metric"] == "disk"
    signed = [raw.encode() for raw in (*out.scores, *out.alerts, *(s for e in emitted for s in e.scores))]
    assert all(verify_message(raw, KEY) is None for raw in signed)  # the sink stores only these
    assert all("signature" not in record for raw in out.scores for record in decode_scores(raw))
    assert alerts[0]["model_version"] == 3 and out.counts["anomalies"] == 1


def test_flags_become_incidents_with_ids_on_their_scores_and_alerts(cfg_defaults):
    settings = DetectorSettings.from_config(cfg_defaults, warmup=40, warmup_per_input=0)  # the default kind
    scoring = scoring_with(settings, micro_batch_size=8)
    state, _ = run(scoring, "a", 40, per_message=8)
    spike = np.tile([0.5, 0.5, 0.5], (8, 1))
    spike[3:5, 2] = 9.0
    state, out = scoring.score(state, "a", [columns("a", 320, 8, values=spike)], Broadcasts(), 5_000)
    records = decode_scores(out.scores[0])
    assert all(r["p_value"] is None or 0 < r["p_value"] <= 1 for r in records)
    flagged = [r for r in records if r["is_anomaly"]]
    assert flagged and {r["incident_id"] for r in flagged} == {"a:323"}
    assert all(r["incident_id"] is None for r in records if not r["is_anomaly"])
    assert {json.loads(a)["incident_id"] for a in out.alerts} == {"a:323"}
    opened = [json.loads(i) for i in out.incidents]
    assert opened[0]["status"] == "open" and opened[0]["incident_id"] == "a:323" and out.counts["incidents_opened"] == 1
    for k in range(3):  # quiet readings: the incident resolves after its gap
        state, out = scoring.score(state, "a", [columns("a", 328 + 8 * k, 8)], Broadcasts(), 6_000)
        if out.incidents:
            break
    resolved = json.loads(out.incidents[-1])
    assert resolved["status"] == "resolved" and resolved["incident_id"] == "a:323" and resolved["end_seq"] >= 324
    # signed with the deployment's key: the sink and the incident router take no other
    assert all(verify_record(record, KEY) is None for record in (*opened, resolved))
    assert verify_record({**resolved, "status": "open"}, KEY) is not None


def test_a_stuck_metric_is_told_in_its_own_incident_and_alerts_name_it(cfg_defaults):
    """With `stuck.enabled`, a metric held still opens an incident ``<device>:<seq>:stuck`` naming it and how long it
    held; its alerts carry ``stuck_metrics`` and are counted (`stuck_flags`)."""
    settings = DetectorSettings.from_config(cfg_defaults, warmup=40, warmup_per_input=0, stuck_enabled=True)
    scoring = scoring_with(settings, micro_batch_size=8)
    state, _ = run(scoring, "a", 40, per_message=8)
    held = np.random.default_rng(5).normal(0.5, 0.05, size=(16, 3))
    held[:, 1] = held[0, 1]
    state, out = scoring.score(state, "a", [columns("a", 320, 16, values=held)], Broadcasts(), 5_000)
    alerts = [json.loads(a) for a in out.alerts if "stuck_metrics" in json.loads(a)]
    assert [a["seq"] for a in alerts] == list(range(326, 336)) and out.counts["stuck_flags"] == 10
    assert alerts[-1]["stuck_metrics"] == [{"metric": METRICS[1], "repeats": 15, "usual": 0}]
    assert {a["incident_id"] for a in alerts} == {"a:326:stuck"}
    stuck = [decode_incident(raw) for raw in out.incidents if json.loads(raw)["incident_id"] == "a:326:stuck"]
    assert stuck[-1]["stuck_metrics"] == [{"metric": METRICS[1], "repeats": 15, "usual": 0}]
    assert stuck[-1]["metrics_to_blame"] == [{"metric": METRICS[1], "share": 1.0}]


def test_snapshot_is_due_by_time_when_the_device_learned_something(settings):
    scoring = scoring_with(settings, snapshot_every=10_000, snapshot_interval_ms=1_000)
    state, emitted = run(scoring, "a", 1, now=0)
    assert not emitted[0].snapshots
    state, out = scoring.score(state, "a", [columns("a", 4, 4)], Broadcasts(), 1_000)
    assert len(out.snapshots) == 1


def test_a_snapshot_larger_than_kafka_takes_is_dead_lettered_instead_of_failing_the_job(settings):
    """Kafka's producer fails the job on a record over its max.request.size, and the job meets the same record after
    every restart (seen: a device of 1,000 metrics in windows of 12, 1.15 MB snapshots, restarted the job nine times
    in two minutes and no device was scored). Such a snapshot becomes a dead letter that says why."""
    size = len(to_json_snapshot(settings))
    scoring = scoring_with(settings, snapshot_every=40, max_record_bytes=size - 1)
    state, emitted = run(scoring, "a", 10)
    assert not [s for out in emitted for s in out.snapshots]
    letters = [json.loads(d) for out in emitted for d in out.dead_letters]
    assert len(letters) == 1 and letters[0]["device_id"] == "a" and verify_record(letters[0], KEY) is None
    reason = letters[0]["reason"]
    assert f"snapshot not sent: {size:,} bytes, more than kafka.max_message_bytes ({size - 1:,})" in reason
    assert sum(out.counts["records_too_large"] for out in emitted) == 1
    assert sum(out.counts["records_scored"] for out in emitted) == 40  # scoring goes on
    _, emitted = run(scoring_with(settings, snapshot_every=40, max_record_bytes=size), "a", 10)
    assert len([s for out in emitted for s in out.snapshots]) == 1


def test_snapshots_taken_while_the_rank_caps_k_are_counted(cfg_defaults):
    """A subspace model whose tracked rank is below the k of its explained-variance rule says so at each
    snapshot (counter `snapshots_rank_bound`); one with room does not."""
    def bound_snapshots(rank):
        settings = DetectorSettings.from_config(cfg_defaults, warmup=40, history=200, subspace_rank=rank)
        _, emitted = run(scoring_with(settings, snapshot_every=40), "a", 30)
        assert sum(out.counts["snapshots"] for out in emitted) == 3
        return sum(out.counts["snapshots_rank_bound"] for out in emitted)

    assert bound_snapshots(1) == 3 and bound_snapshots(15) == 0


def to_json_snapshot(settings) -> bytes:
    """The first snapshot of device "a" after 40 readings (`run`), as the job sends it."""
    _, emitted = run(scoring_with(settings, snapshot_every=40), "a", 10)
    return next(s for out in emitted for s in out.snapshots).encode()


def test_unknown_metrics_are_counted_and_reported_once_missing_ones_imputed(settings):
    scoring = scoring_with(settings)
    state, _ = run(scoring, "a", 1)
    grown = columns("a", 4, 4, names=[*METRICS, "zz"])
    state, out = scoring.score(state, "a", [grown], Broadcasts(), 1_000)
    assert out.counts["metric_values_ignored"] == 4 and len(out.dead_letters) == 1
    assert "metrics zz are not in the device's model" in json.loads(out.dead_letters[0])["reason"]
    state, out = scoring.score(state, "a", [columns("a", 8, 4, names=[*METRICS, "zz"])], Broadcasts(), 1_000)
    assert out.counts["metric_values_ignored"] == 4 and not out.dead_letters
    for seq, extra in ((12, "yy"), (16, "xx")):  # new names in every message: a letter each, one set remembered
        renamed = columns("a", seq, 4, names=[*METRICS, extra])
        state, out = scoring.score(state, "a", [renamed], Broadcasts(), 1_000)
        assert len(out.dead_letters) == 1 and scoring.reported_unknown == {"a": (extra,)}
    shrunk = columns("a", 20, 4, names=["cpu", "disk"])
    state, out = scoring.score(state, "a", [shrunk], Broadcasts(), 1_000)
    assert out.counts["values_imputed"] == 4 and not out.dead_letters and len(decode_scores(out.scores[0])) == 4


def test_reject_policy_dead_letters_readings_with_missing_values_and_scores_the_rest(cfg_defaults):
    settings = DetectorSettings.from_config(cfg_defaults, kind="ae", hidden=(4, 2, 4), nan_policy="reject")
    scoring = scoring_with(settings)
    values = np.full((4, 3), 0.5)
    values[1, 0] = math.nan
    state, out = scoring.score(None, "a", [columns("a", 0, 4, values=values)], Broadcasts(), 1_000)
    assert [r["seq"] for raw in out.scores for r in decode_scores(raw)] == [0, 2, 3]
    assert len(out.dead_letters) == 1 and json.loads(json.loads(out.dead_letters[0])["raw"])["seq"] == 1


def test_duplicates_are_neither_scored_nor_learned_again(settings):
    scoring = scoring_with(settings)
    state, _ = run(scoring, "a", 2)  # seqs 0..7
    again = columns("a", 4, 4)
    n_seen = state.detector.n_seen
    state, out = scoring.score(state, "a", [again], Broadcasts(), 1_000)
    assert not out.scores and out.counts["duplicates_dropped"] == 4 and state.detector.n_seen == n_seen
    overlapping = [columns("a", 6, 4), columns("a", 6, 4)]  # the same message twice in one micro-batch
    state, out = scoring.score(state, "a", overlapping, Broadcasts(), 1_000)
    assert [r["seq"] for r in decode_scores(out.scores[0])] == [8, 9]
    assert out.counts["duplicates_dropped"] == 6 and state.last_seq == 9 and state.detector.n_seen == n_seen + 2


def test_event_times_outside_the_window_are_dead_lettered_the_rest_scored(settings):
    scoring = scoring_with(settings, timestamp_window_ms=10_000)
    # the readings are at ts 0, 1000, 2000, 3000 (seq * 1000): only the first is more than 10 s before 10.5 s
    state, out = scoring.score(None, "a", [columns("a", 0, 4)], Broadcasts(), 10_500)
    assert [r["seq"] for r in decode_scores(out.scores[0])] == [1, 2, 3]
    assert out.counts["timestamps_refused"] == 1 and len(out.dead_letters) == 1
    reason = json.loads(out.dead_letters[0])["reason"]
    assert reason.startswith("1 reading(s) with an event time more than stream.timestamp_window_s = 10 s from now")
    _, out = scoring.score(state, "a", [columns("a", 4, 4)], Broadcasts(), 10**12)
    assert not out.scores and out.counts["timestamps_refused"] == 4


# -- broadcasts: global models, feedback, cohorts -------------------------------------------------------------

def test_global_models_verified_newer_ones_kept_forged_ones_refused_and_reported_once(settings):
    scoring = scoring_with(settings)
    held = Broadcasts()
    weights = DeviceDetector(METRICS, settings).get_weights()
    entry, out = scoring.receive_broadcast(model_record(weights, 2), held, report=True)
    assert entry[0] == "model:" + FLEET and entry[1][0] == 2 and not out.dead_letters
    assert held.models.newest_for("any").version == 2
    entry, out = scoring.receive_broadcast(model_record(weights, 1), held, report=True)
    assert entry is None and not out.dead_letters and not out.counts  # older: a replay, nothing to say
    forged = [model_record(weights, 1000, key=bytes(32)),  # signed with another key
              json.dumps({**json.loads(model_record(weights, 3)), "version": 1000}),  # altered after signing
              model_record(weights, 1000),  # validly signed, but far ahead of anything published
              json.dumps({"schema": "flead.global-model/1", "version": 3, "weights": "AAAA", "created_at": 0})]
    reasons = []
    for record in forged:
        for report, letters in ((False, 0), (True, 1)):
            entry, out = scoring.receive_broadcast(record, held, report=report)
            assert entry is None and len(out.dead_letters) == letters and out.counts["global_models_rejected"] == 1
        reasons.append(json.loads(out.dead_letters[0])["reason"])
    assert "bad signature" in reasons[0] and "bad signature" in reasons[1]
    assert "more than 10 ahead of the newest version seen (v2)" in reasons[2] and "unsigned" in reasons[3]
    entry, _ = scoring.receive_broadcast(model_record(weights, 3), held, report=True)
    assert entry is not None and held.models.newest_for("x").version == 3  # the real next version still comes in
    with pytest.raises(InvalidMessage, match="non-finite"):
        global_model_of({"version": 4, "weights": to_b64(dumps([np.array([np.nan])], {}))})
    entry, out = scoring.receive_broadcast(b"junk", held, report=True)
    assert entry is None and out.counts["broadcasts_rejected"] == 1 and "not JSON" in out.dead_letters[0]


def feedback_record(device="a", incident="a:8", verdict="false_positive", ratio=3.0, created_at=1, key=KEY):
    record = FEEDBACK.make(incident_id=incident, device_id=device, verdict=verdict, peak_score=ratio,
                           peak_ratio=ratio, metrics_to_blame=[{"metric": "disk", "share": 0.9},
                                                               {"metric": "cpu", "share": 0.1}],
                           start_ts=0, model_version=1, created_at=created_at)
    return json.dumps(sign_record(record, key)).encode()


def test_a_false_positive_mutes_the_same_pattern_on_its_device_only(settings):
    scoring = scoring_with(settings)
    held = Broadcasts()
    state, _ = run(scoring, "a", 30, models=held)
    other, _ = run(scoring, "b", 30, models=held)
    spike = np.tile([0.5, 0.5, 0.5], (4, 1))
    spike[2, 2] = 9.0
    state, out = scoring.score(state, "a", [columns("a", 120, 4, values=spike)], held, 2_000)
    alert = json.loads(out.alerts[0])
    ratio = alert["score"] / alert["threshold"]  # the operator calls this disk-blamed incident a false positive
    for bad in (feedback_record(key=bytes(32)), b'{"schema": "flead.feedback/1"}'):
        entry, out = scoring.receive_broadcast(bad, held, report=True)
        assert entry is None and out.counts["broadcasts_rejected"] == 1 and len(out.dead_letters) == 1
    assert json.loads(out.dead_letters[0])["source"] == "t.feedback"
    entry, out = scoring.receive_broadcast(feedback_record(ratio=ratio), held, report=True)
    assert entry[0] == "feedback:a" and not out.dead_letters
    spike = np.tile([0.5, 0.5, 0.5], (4, 1))
    spike[1, 2] = 9.0
    state, out = scoring.score(state, "a", [columns("a", 124, 4, values=spike)], held, 3_000)
    assert not out.alerts and out.counts["anomalies_muted"] == 1 and out.counts["feedback_applied"] == 1
    _, out = scoring.score(other, "b", [columns("b", 120, 4, values=spike)], held, 3_000)
    assert len(out.alerts) == 1  # another device: not muted
    stronger = spike.copy()
    stronger[1, 2] = 90.0
    state, out = scoring.score(state, "a", [columns("a", 128, 4, values=stronger)], held, 3_000)
    assert len(out.alerts) == 1 and "feedback_applied" not in out.counts  # a stronger anomaly still alerts
    assert len(scoring.mute_patterns(held, "a", Emitted())) == 1
    scoring.receive_broadcast(feedback_record(verdict="confirmed", ratio=ratio, created_at=2), held, report=True)
    assert scoring.mute_patterns(held, "a", Emitted()) == ()  # confirmed replaces the false positive: no pattern
    restored = Broadcasts([("feedback:a", held.feedback["a"])])
    assert restored.feedback_for("a") == held.feedback_for("a")


def enrolled(settings) -> tuple[StreamScoring, Broadcasts, dict, dict]:
    """Devices a, b, c under secure aggregation after one message each: the scoring, the broadcasts, their states
    and their first snapshots (enrolments)."""
    scoring = scoring_with(settings, snapshot_every=4, secure_aggregation=True)
    held = Broadcasts()
    states, first = {}, {}
    for device in ("a", "b", "c"):
        states[device], emitted = run(scoring, device, 1, models=held)
        first[device] = json.loads(emitted[0].snapshots[0])
    return scoring, held, states, first


def test_snapshots_are_signed_and_secure_aggregation_answers_cohorts_with_masked_vectors(settings):
    plain = scoring_with(settings, snapshot_every=4)
    _, emitted = run(plain, "a", 1)
    snap = json.loads(emitted[0].snapshots[0])
    assert verify_record(snap, KEY) is None and verify_record({**snap, "n_samples": 2**53}, KEY) is not None

    scoring, held, states, first = enrolled(settings)
    assert all(r["encoding"] == secagg.ENROLMENT and r["weights"] == secagg.NO_WEIGHTS for r in first.values())
    assert all(verify_record(r, KEY) is None for r in first.values())
    cohort = sign_record(secagg.choose_cohort(list(first.values()), "r1", 0, 1000.0, 5, AGGREGATOR_ISSUER), KEY)
    entry, out = scoring.receive_broadcast(json.dumps(cohort), held, report=True)
    assert entry == ("cohort", cohort) and not out.dead_letters
    masked, vectors = {}, {}
    for device in ("a", "b", "c"):
        states[device], out = scoring.score(states[device], device, [columns(device, 4, 4)], held, 2_000)
        [record] = [json.loads(r) for r in out.snapshots]
        assert record["encoding"] == secagg.MASKED and record["secure_round"] == "r1"
        assert verify_record(record, KEY) is None
        masked[device] = secagg.decode_words(record["weights"], cohort["length"])
        vectors[device] = np.concatenate([w.ravel() for w in states[device].detector.get_weights()])
        states[device], out = scoring.score(states[device], device, [columns(device, 8, 4)], held, 3_000)
        assert out.snapshots == []  # one answer per round
    total = secagg.unmask_sum(masked, secagg.cohort_from_record(cohort))
    assert total[-1] == pytest.approx(3 * 4)  # each answered with the 4 readings learned since its enrolment
    assert np.allclose(total[:-1] / total[-1], np.mean(list(vectors.values()), axis=0), atol=1e-4)
    copy = pickle.loads(pickle.dumps(states["a"]))
    assert copy.secure_keys() == states["a"].secure_keys() and copy.answered_round == "r1"


def test_a_clusters_model_in_parts_is_taken_whole_whatever_order_its_parts_come_in(settings):
    """A cluster's model is sent as parts of one version, identical but for their members: each worker verifies
    every part and adopts the union of their members; a part seen again changes nothing."""
    scoring = scoring_with(settings)
    weights = DeviceDetector(METRICS, settings).get_weights()
    held = Broadcasts()
    for members in (["c", "d"], ["a", "b"], ["c", "d"]):
        scoring.receive_broadcast(model_record(weights, 1, cluster=0, members=members), held, report=True)
    assert np.array_equal(held.models.by_cluster["0"].members, member_keys("abcd"))
    assert all(held.models.newest_for(d) is held.models.by_cluster["0"] for d in "abcd")
    entry, out = scoring.receive_broadcast(model_record(weights, 1, cluster=0, members=["e"], key=bytes(32)), held,
                                           report=True)
    assert entry is None and out.counts["global_models_rejected"] == 1
    assert held.models.newest_for("e") is None
    entry, _ = scoring.receive_broadcast(model_record(weights, 1, cluster=0, members=["b"]), held, report=True)
    assert entry is None  # nothing new
    restored = Broadcasts([model_entry("0", held.models.by_cluster["0"])])
    assert np.array_equal(restored.models.by_cluster["0"].members, member_keys("abcd"))
    written_before = Broadcasts([("model:0", (1, weights, frozenset("abcd")))])  # members kept as a set of ids
    assert all(written_before.models.newest_for(d).version == 1 for d in "abcd")
    assert written_before.models.newest_for("e") is None


@given(st.sets(st.text(min_size=1, max_size=12), max_size=60), st.lists(st.text(max_size=12), max_size=20))
def test_a_member_list_holds_exactly_its_devices(members, others):
    """A worker keeps a cluster's member list as sorted 64-bit keys: a device is held if and only if it is a
    member (no collision among these few ids), whatever order and repetition the ids came in."""
    keys = member_keys(sorted(members) + sorted(members, reverse=True))
    assert len(keys) == len(members) and (np.diff(keys.astype(np.float64)) >= 0).all()
    for device in list(members) + others:
        assert holds(keys, member_key(device)) == (device in members)


def test_a_device_adopts_its_clusters_model_unless_a_newer_fleet_model_came():
    w = [np.zeros(2)]
    models = GlobalModels([(FLEET, GlobalModel(3, w, member_keys(())))])
    assert models.newest_for("a").version == 3
    models.offer("1", GlobalModel(4, w, member_keys({"a"})))
    models.offer("0", GlobalModel(4, w, member_keys({"b"})))
    assert models.newest_for("a") is models.by_cluster["1"] and models.newest_for("b") is models.by_cluster["0"]
    assert models.newest_for("c").version == 3
    models.offer(FLEET, GlobalModel(5, w, member_keys(())))
    assert models.newest_for("a").version == 5
    assert not models.offer(FLEET, GlobalModel(5, w, member_keys(())))


def test_adoption_replaces_weights_once_per_version_and_refuses_other_shapes_once(settings):
    scoring = scoring_with(settings)
    other = DeviceDetector(METRICS, settings).get_weights()
    target = [np.full_like(w, 0.01) for w in other]
    models = Broadcasts()
    scoring.receive_broadcast(model_record(target, 1), models, report=False)
    state, emitted = run(scoring, "a", 1, models=models)
    assert state.detector.global_version == 1 and emitted[0].counts["global_models_adopted"] == 1
    state, out = scoring.score(state, "a", [columns("a", 4, 4)], models, 1_000)
    assert "global_models_adopted" not in out.counts
    scoring.receive_broadcast(model_record([np.zeros(3)], 2), models, report=False)
    state, out = scoring.score(state, "a", [columns("a", 8, 4)], models, 1_000)
    assert out.counts["global_models_rejected"] == 1 and len(out.dead_letters) == 1
    state, out = scoring.score(state, "a", [columns("a", 12, 4)], models, 1_000)
    assert "global_models_rejected" not in out.counts and state.detector.global_version == 1
    _, out = scoring.score(None, "b", [columns("b", 0, 4)], models, 1_000)
    assert out.counts["global_models_rejected"] == 1 and not out.dead_letters  # one dead letter per version
    assert scoring.refused_global == {"a": 2, "b": 2}  # one entry per device, whatever it was sent


def test_a_restored_device_takes_the_jobs_changed_configuration(settings):
    """A device's state made under one adoption policy, restored into a job configured with another: the job's
    policy applies (`DeviceDetector.reconfigure`, counted once)."""
    import dataclasses
    made_under_blend = scoring_with(dataclasses.replace(settings, adoption_policy="blend"))
    state, _ = run(made_under_blend, "a", 1)
    state = pickle.loads(pickle.dumps(state))      # a checkpoint restored after a configuration change
    assert state.detector.settings.adoption_policy == "blend"
    target = [np.full_like(w, 0.01) for w in state.detector.get_weights()]
    models = Broadcasts()
    replacing = scoring_with(dataclasses.replace(settings, adoption_policy="replace"))
    replacing.receive_broadcast(model_record(target, 1), models, report=False)
    state, out = replacing.score(state, "a", [columns("a", 4, 4)], models, 1_000)
    assert out.counts["global_models_adopted"] == 1 and state.detector.global_version == 1
    assert out.counts["devices_reconfigured"] == 1 and state.detector.settings.adoption_policy == "replace"
    assert len(state.detector.get_weights()) == len(target)
    for w in state.detector.get_weights():   # replaced (then 4 readings learned: close to 0.01, not the old ones)
        assert np.allclose(w, 0.01, atol=0.05)
    state, out = replacing.score(state, "a", [columns("a", 8, 4)], models, 1_000)
    assert "devices_reconfigured" not in out.counts   # once


def test_state_and_scoring_survive_pickling(settings):
    scoring = scoring_with(settings)
    state, _ = run(scoring, "a", 3)
    copy = pickle.loads(pickle.dumps(state))
    assert isinstance(copy, DeviceState) and copy.detector.n_seen == 12
    assert copy.detector.to_bytes() == state.detector.to_bytes()
    scoring.reported_unknown["a"] = ("zz",)
    assert pickle.loads(pickle.dumps(scoring)).reported_unknown == {}


# -- the Flink adapter, driven by fakes ----------------------------------------------------------------------

class FakeValueState:
    def __init__(self):
        self.v = None

    def value(self):
        return self.v

    def update(self, v):
        self.v = v

    def clear(self):
        self.v = None


class FakeBroadcastState(dict):
    def put(self, key, value):
        self[key] = value


class FakeTimers:
    """The timers set, as Flink's timer service holds them (deleting one that is not set does nothing)."""

    def __init__(self):
        self.processing, self.event = [], []

    def current_processing_time(self):
        return 5_000

    def register_processing_time_timer(self, t):
        self.processing.append(t)

    def register_event_time_timer(self, t):
        self.event.append(t)

    def delete_processing_time_timer(self, t):
        if t in self.processing:
            self.processing.remove(t)

    def delete_event_time_timer(self, t):
        if t in self.event:
            self.event.remove(t)


class FakeContext:
    def __init__(self, key="a"):
        self.key, self.timers, self.broadcast = key, FakeTimers(), FakeBroadcastState()

    def get_current_key(self):
        return self.key

    def timer_service(self):
        return self.timers

    def timestamp(self):
        return 7_000

    def get_broadcast_state(self, descriptor):
        return self.broadcast


class FakeCounter:
    def __init__(self):
        self.n = 0

    def inc(self, n=1):
        self.n += n


class FakeRuntime:
    def __init__(self):
        self.states = {}
        self.counters = {}

    def get_state(self, descriptor):
        return self.states.setdefault(descriptor.name, FakeValueState())

    def get_metrics_group(self):
        return self

    def counter(self, name):
        return self.counters.setdefault(name, FakeCounter())

    def get_index_of_this_subtask(self):
        return 0


def test_flink_adapter_forwards_every_callback_to_the_scoring_module(settings):
    pytest.importorskip("pyflink")
    from flink_jobs.anomaly_job import ALERTS, DEAD_LETTERS, DRIFT, INCIDENTS, SNAPSHOTS, DeviceScorer

    scorer = DeviceScorer(StreamScoring(settings, options(micro_batch_size=4, snapshot_every=8)), batch_timeout_ms=100,
                          key_source=(KEY.hex(), None), max_feedback=8)
    runtime, ctx = FakeRuntime(), FakeContext()
    scorer.open(runtime)
    assert set(runtime.counters) == set(COUNTERS)

    weights = DeviceDetector(METRICS, settings).get_weights()
    assert list(scorer.process_broadcast_element(model_record(weights, 1), ctx)) == []
    assert ctx.broadcast["model:" + FLEET][0] == 1
    assert list(scorer.process_broadcast_element(model_record(weights, 1), ctx)) == []  # not newer: not kept again
    assert [tag for tag, _ in scorer.process_broadcast_element(b"junk", ctx)] == [DEAD_LETTERS]

    assert [tag for tag, _ in scorer.process_element(message("b", 0, 2), ctx)] == [DEAD_LETTERS]
    assert list(scorer.process_element(message("a", 0, 2), ctx)) == []  # buffered, a live job's flush timer set
    assert ctx.timers.processing == [5_100] and ctx.timers.event == []
    assert list(scorer.process_element(message("a", 2, 1), ctx)) == []  # still buffered
    out = list(scorer.process_element(message("a", 3, 1), ctx))  # 4 readings: scored, its flush timer deleted
    assert len(out) == 1 and isinstance(out[0], str) and runtime.states["detector"].v.buffered is None
    assert ctx.timers.processing == []
    assert list(scorer.on_timer(0, ctx)) == []  # nothing buffered
    list(scorer.process_element(message("a", 4, 1), ctx))
    assert ctx.timers.processing == [5_100]
    out = list(scorer.on_timer(5_100, ctx))  # flushes the partial batch
    assert len(out) == 1 and runtime.states["detector"].v.state.detector.n_seen == 5
    out = list(scorer.process_element(message("a", 5, 4), ctx))  # 9 learned since the start: snapshot due
    assert [o[0] for o in out if isinstance(o, tuple)] == [SNAPSHOTS]
    assert runtime.counters["records_scored"].n == 9 and runtime.counters["global_models_adopted"].n == 1

    everything = Emitted(scores=["s"], alerts=["a"], snapshots=["n"], dead_letters=["d"], incidents=["i"],
                         drift=["r"])
    everything.counts["anomalies"] = 2
    assert list(scorer.emit(everything)) == ["s", (ALERTS, "a"), (SNAPSHOTS, "n"), (DEAD_LETTERS, "d"),
                                             (INCIDENTS, "i"), (DRIFT, "r")]
    assert runtime.counters["anomalies"].n == 2


def test_the_operator_changes_the_worker_only_as_configured(monkeypatch):
    pytest.importorskip("pyflink")
    from flink_jobs import anomaly_job

    calls = []
    monkeypatch.setattr(anomaly_job, "without_sampling_thread", lambda *args: calls.append("sampling"))
    monkeypatch.setattr(anomaly_job, "freeze_startup_objects", lambda: calls.append("freeze"))

    def opened(**settings):
        calls.clear()
        scoring = SimpleNamespace(use_key=lambda key: None)
        anomaly_job.DeviceScorer(scoring, 100, (KEY.hex(), None), 8, **settings).open(FakeRuntime())
        return sorted(calls)

    assert opened() == []  # the constructor's defaults leave Beam and the collector alone (as in tests)
    assert opened(bundle_state_sampling=False, freeze_startup=True) == ["freeze", "sampling"]
    assert opened(bundle_state_sampling=True, freeze_startup=False) == []


def test_a_bounded_run_also_flushes_by_event_time_and_deletes_both_timers(settings):
    """Processing-time timers do not fire once a bounded run's input has ended: there a partial micro-batch also
    gets an event-time timer. Whichever way the batch is scored, no timer of it is left to call back for nothing."""
    pytest.importorskip("pyflink")
    from flink_jobs.anomaly_job import END_OF_INPUT_FLUSH_DELAY_MS, DeviceScorer

    scorer = DeviceScorer(StreamScoring(settings, options(micro_batch_size=4)), batch_timeout_ms=100,
                          key_source=(KEY.hex(), None), max_feedback=8, bounded=True)
    runtime, ctx = FakeRuntime(), FakeContext()
    scorer.open(runtime)
    list(scorer.process_element(message("a", 0, 2), ctx))
    assert ctx.timers.processing == [5_100] and ctx.timers.event == [7_000 + END_OF_INPUT_FLUSH_DELAY_MS]
    assert len(list(scorer.process_element(message("a", 2, 2), ctx))) == 1  # scored by size
    assert ctx.timers.processing == [] and ctx.timers.event == []
    list(scorer.process_element(message("a", 4, 2), ctx))
    assert len(list(scorer.on_timer(7_000 + END_OF_INPUT_FLUSH_DELAY_MS, ctx))) == 1  # end of input
    assert ctx.timers.processing == [] and runtime.states["detector"].v == KeyedDevice(runtime.states["detector"].v.state)


def test_keyed_device_reads_every_layout_a_checkpoint_may_hold(settings):
    """Checkpoints before `KeyedDevice` held the `DeviceState` alone and the partial micro-batch in a state of its
    own: its list of messages, or, later, ``(timers, messages)``."""
    state = DeviceState(DeviceDetector(METRICS, settings), 0)
    held = KeyedDevice(state, [columns("a", 0, 2)], (1_100, None))
    assert KeyedDevice.of(held, ["ignored"]) is held
    assert KeyedDevice.of(None) == KeyedDevice()
    assert KeyedDevice.of(state, ["m"]) == KeyedDevice(state, ["m"], None)
    assert KeyedDevice.of(state, ((1_100, None), ["m"])) == KeyedDevice(state, ["m"], (1_100, None))
    copy = pickle.loads(pickle.dumps(held))
    assert isinstance(copy, KeyedDevice) and copy.timers == (1_100, None) and copy.buffered[0].seqs == [0, 1]
    assert copy.state.detector.to_bytes() == state.detector.to_bytes()


def test_state_restored_in_the_earlier_two_state_layout_is_scored_and_moved_into_one(settings):
    """A device restored from a checkpoint of the earlier layout: its buffered readings are scored with its model,
    the older buffer state is cleared, and from then on one keyed state is written per callback."""
    pytest.importorskip("pyflink")
    from flink_jobs.anomaly_job import DeviceScorer, pending_timers

    assert pending_timers(1_000, 2_000, 100, bounded=False) == (1_100, None)
    assert pending_timers(1_000, 2_000, 100, bounded=True)[1] > 2_000
    scoring = StreamScoring(settings, options(micro_batch_size=4))
    scorer = DeviceScorer(scoring, batch_timeout_ms=100, key_source=(KEY.hex(), None), max_feedback=8)
    runtime, ctx = FakeRuntime(), FakeContext()
    scorer.open(runtime)
    runtime.states["detector"].v, _ = scoring.score(None, "a", [columns("a", 0, 4)], Broadcasts(), 1_000)
    runtime.states["buffer"].v = [columns("a", 4, 2)]  # as the oldest checkpoints hold it
    assert sum(isinstance(o, str) for o in scorer.process_element(message("a", 6, 2), ctx)) == 1  # a score batch
    held = runtime.states["detector"].v
    assert held.state.detector.n_seen == 8 and held.buffered is None and runtime.states["buffer"].v is None
    assert ctx.timers.processing == []

    runtime.states["detector"].v = held.state
    runtime.states["buffer"].v = ((5_100, None), [columns("a", 8, 2)])  # timers kept beside the messages
    ctx.timers.processing = [5_100]
    assert sum(isinstance(o, str) for o in scorer.on_timer(5_100, ctx)) == 1
    assert runtime.states["detector"].v == KeyedDevice(runtime.states["detector"].v.state)
    assert runtime.states["detector"].v.state.detector.n_seen == 10 and ctx.timers.processing == [] and runtime.states["buffer"].v is None


def test_a_device_declared_dropped_never_answers_the_round_late(settings):
    """The survivors reveal their pair seeds with a dropped device: its masked vector, sent late, would give the
    aggregator its update in the clear. A device listed in ``dropped`` sends nothing for that round."""
    scoring, held, states, first = enrolled(settings)
    cohort = secagg.choose_cohort(list(first.values()), "r1.1", 0, 1000.0, 5, AGGREGATOR_ISSUER)
    scoring.receive_broadcast(json.dumps(sign_record({**cohort, "dropped": ["c"], "created_at": 6}, KEY)), held,
                              report=True)
    _, out = scoring.score(states["c"], "c", [columns("c", 4, 4)], held, 2_000)
    assert out.snapshots == []
    _, out = scoring.score(states["a"], "a", [columns("a", 4, 4)], held, 2_000)
    [answer, reveal] = [json.loads(r) for r in out.snapshots]
    assert answer["encoding"] == secagg.MASKED and reveal["encoding"] == secagg.SEED_REVEAL


def test_counts_made_in_a_timer_go_to_the_scope_of_the_operators_elements(monkeypatch):
    """PyFlink runs `on_timer` outside the operator's Beam metrics scope: a timer's counts are made inside the scope
    the last element callback ran in, or wait for the next element (`ScorerCounters`)."""
    from flink_jobs import anomaly_job

    class Scope:
        entered = 0

        def __enter__(self):
            self.entered += 1

        def __exit__(self, *exc):
            return False

    class Count:
        def __init__(self):
            self.n, self.in_scope = 0, []

        def inc(self, n):
            self.n += n
            self.in_scope.append(scope.entered)

    scope, tracker = Scope(), None
    monkeypatch.setattr(anomaly_job.statesampler, "get_current_tracker", lambda: tracker)
    counts = {"records_scored": Count()}
    counters = anomaly_job.ScorerCounters(type("Group", (), {"counter": lambda self, name: counts[name]})(),
                                          ["records_scored"])
    counters.add({"records_scored": 3}, in_timer=True)  # a timer before any element: kept
    assert counts["records_scored"].n == 0
    tracker = type("Tracker", (), {"current_state": lambda self: scope})()
    counters.in_element()
    assert counts["records_scored"].n == 3
    counters.add({"records_scored": 2}, in_timer=True)
    assert counts["records_scored"].n == 5 and scope.entered == 1 and counts["records_scored"].in_scope == [0, 1]


def test_a_batch_the_detector_fails_on_is_dead_lettered_and_the_next_one_scored(settings, monkeypatch):
    """A poison batch must not fail the job (it would meet the batch again after every restart)."""
    scoring = scoring_with(settings)
    state, _ = run(scoring, "a", 1)
    genuine = DeviceDetector.process_many

    def failing(self, X, *args, **kwargs):
        raise np.linalg.LinAlgError("eigendecomposition of a 20×20 matrix did not converge")

    monkeypatch.setattr(DeviceDetector, "process_many", failing)
    state, out = scoring.score(state, "a", [columns("a", 4, 4)], Broadcasts(), 1_000)
    assert out.counts["scoring_errors"] == 1 and not out.scores and len(out.dead_letters) == 1
    letter = json.loads(out.dead_letters[0])
    assert "scoring failed, batch not scored (LinAlgError: eigendecomposition" in letter["reason"]
    assert json.loads(letter["raw"]) == {"device_id": "a", "seq_first": 4, "seq_last": 7, "readings": 4}
    monkeypatch.setattr(DeviceDetector, "process_many", genuine)
    state, out = scoring.score(state, "a", [columns("a", 8, 4)], Broadcasts(), 1_000)
    assert [r["seq"] for raw in out.scores for r in decode_scores(raw)] == [8, 9, 10, 11]


@examples(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20),
                          st.sampled_from(["normal", "huge", "tiny", "constant", "mixed"]), st.integers(0, 2**32)),
                min_size=1, max_size=8))
def test_valid_telemetry_with_hostile_values_is_scored_without_a_failure(batches):
    """Whatever valid values a device sends (up to the wire's limit, NaN, constants, subnormals), every batch is
    scored with finite scores: none is dead-lettered as a scoring failure (the hostile-values fuzz, as a test)."""
    from config import load_config
    scoring = StreamScoring(DetectorSettings.from_config(load_config(env={})), options(micro_batch_size=16))
    scoring.use_key(KEY)
    state, seq = None, 0
    for n, kind, seed in batches:
        rng = np.random.default_rng(seed)
        values = {"normal": lambda: rng.normal(size=(n, 3)),
                  "huge": lambda: rng.choice([-1.0, 1.0], size=(n, 3)) * MAX_ABS_VALUE,
                  "tiny": lambda: rng.normal(size=(n, 3)) * 5e-324,
                  "constant": lambda: np.full((n, 3), rng.choice([0.0, 1e-300, MAX_ABS_VALUE])),
                  "mixed": lambda: np.where(rng.random((n, 3)) < 0.3, rng.choice([np.nan, MAX_ABS_VALUE, -1e-300]),
                                            rng.normal(size=(n, 3)))}[kind]()
        state, out = scoring.score(state, "a", [columns("a", seq, n, values=values)], Broadcasts(), 1_000)
        seq += n
        assert "scoring_errors" not in out.counts, out.dead_letters
        assert all(r["score"] is not None and math.isfinite(r["score"]) for raw in out.scores
                   for r in decode_scores(raw))
