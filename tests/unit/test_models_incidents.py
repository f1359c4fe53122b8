"""IncidentTracker: incidents open and close as specified; its grouping is the evaluation's."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.incidents import IncidentTracker, incident_id
from models.metrics import flag_groups

NAMES = ["cpu", "mem", "disk"]


def run(tracker, flags, batch=5, ts=None, start_seq=0):
    flags = np.asarray(flags, dtype=bool)
    n = len(flags)
    starts, ranks, changes = [], [], []
    for i in range(0, n, batch):
        f = flags[i:i + batch]
        shares = np.tile([0.6, 0.3, 0.1], (int(f.sum()), 1))
        out = tracker.update(f, np.where(f, 4.0, 0.5), np.full(len(f), 2.0), shares,
                             np.arange(start_seq + i, start_seq + i + len(f)),
                             None if ts is None else np.asarray(ts[i:i + batch]))
        starts.append(out.starts)
        ranks.append(out.ranks)
        changes += out.changes
    return np.concatenate(starts), np.concatenate(ranks), changes


def test_an_incident_opens_grows_and_is_resolved_after_the_gap():
    tracker = IncidentTracker(NAMES, gap_readings=3)
    flags = [0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    starts, ranks, changes = run(tracker, flags, batch=5, start_seq=100)
    assert starts.tolist()[2:7] == [102, -1, -1, 102, 102] and ranks.tolist()[5:7] == [2, 3]
    assert [(c.status, c.start_seq, c.end_seq, c.n_flagged, c.n_readings) for c in changes] == [
        ("open", 102, 102, 1, 1),      # batch 1: opened
        ("open", 102, 106, 3, 5),      # batch 2: grew
        ("resolved", 102, 106, 3, 5)]  # batch 3: more than 3 unflagged readings after the last flag
    record = changes[-1].record_fields("omi-1", updated_at=99)
    assert record["incident_id"] == "omi-1:102" == incident_id("omi-1", 102)
    assert record["status"] == "resolved"
    assert record["metrics_to_blame"][0] == {"metric": "cpu", "share": pytest.approx(0.6)}
    assert record["peak_score"] == 4.0 and record["peak_ratio"] == 2.0 and record["updated_at"] == 99
    assert set(record) == {"incident_id", "device_id", "status", "start_seq", "end_seq", "start_ts",
                           "end_ts", "n_flagged", "n_readings", "peak_score", "peak_ratio", "metrics_to_blame",
                           "model_version", "global_version", "updated_at"}
    assert "stuck_metrics" not in record   # a field of stuck-metric incidents only
    assert tracker.n_incidents == 1 and not tracker.is_open


def test_a_gap_in_time_also_ends_an_incident_and_expire_closes_silent_devices():
    tracker = IncidentTracker(NAMES, gap_readings=100, gap_ms=60_000)
    ts = [0, 10_000, 200_000, 210_000]
    _, _, changes = run(tracker, [1, 0, 1, 0], batch=4, ts=ts)
    assert [(c.status, c.start_seq) for c in changes] == [("open", 0), ("resolved", 0), ("open", 2)]
    assert tracker.expire(now_ts=250_000) == []           # 40 s after the last flag: still open
    [resolved] = tracker.expire(now_ts=300_000)
    assert resolved.status == "resolved" and resolved.end_ts == 200_000


def test_state_round_trip_mid_incident():
    tracker = IncidentTracker(NAMES, gap_readings=2)
    run(tracker, [0, 1, 1, 0], batch=4)
    clone = IncidentTracker.from_array(tracker.to_array(), NAMES)
    a, b = run(tracker, [0, 1, 0, 0, 0], start_seq=4), run(clone, [0, 1, 0, 0, 0], start_seq=4)
    assert a[2] == b[2] and a[2][-1].n_flagged == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=120), st.integers(0, 6), st.integers(1, 17))
def test_tracker_groups_flags_as_the_evaluation_does(flags, gap, batch):
    """The stream's incidents (any micro-batching) are the evaluation's `flag_groups`."""
    tracker = IncidentTracker(NAMES, gap_readings=gap)
    _, _, changes = run(tracker, flags, batch=batch)
    resolved = [(c.start_seq, c.end_seq + 1) for c in changes if c.status == "resolved"]
    if tracker.is_open:
        resolved.append((tracker.start_seq, tracker.end_seq + 1))
    assert resolved == flag_groups(np.array(flags, dtype=int), gap)


def test_records_pass_the_wire_formats_of_telemetry_schema():
    from models.drift import DriftEvent
    from telemetry.schema import DRIFT, INCIDENT
    tracker = IncidentTracker(NAMES, gap_readings=1)
    _, _, changes = run(tracker, [1, 1, 0, 0], batch=4, ts=[1000, 2000, 3000, 4000])
    for change in changes:
        INCIDENT.make(**change.record_fields("omi-1", updated_at=5000))
    event = DriftEvent(seq=7, ts=7000, reason="r", flag_rate=0.3, target_rate=0.01, window=288)
    DRIFT.make(**event.record_fields("omi-1", detected_at=8000, model_version=2))
