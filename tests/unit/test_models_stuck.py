"""models.stuck: runs of repeated values against the device's own longest runs; a stuck metric in the detector."""
import numpy as np
from hypothesis import given, settings, strategies as st

from config import load_config
from models.detector import DeviceDetector
from models.incidents import STUCK
from models.serialization import loads
from models.stuck import StuckMonitor


def quantised(n, d, seed=0, levels=4):
    """Metrics that often repeat (few levels), as quantised server telemetry does."""
    return np.random.default_rng(seed).integers(0, levels, size=(n, d)).astype(float)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 199), max_size=6))
def test_batches_do_not_change_runs_flags_or_state(seed, cuts):
    """Split anywhere, a stream gives the same runs, flags and final state as in one batch."""
    X = quantised(200, 3, seed, levels=2)
    X[120:170, 1] = 7.0   # a long hold
    whole, parts = StuckMonitor(3, warmup=30), StuckMonitor(3, warmup=30)
    one = whole.update(X)
    edges = [0, *sorted(set(cuts)), 200]
    pieces = [parts.update(X[a:b]) for a, b in zip(edges, edges[1:]) if b > a]
    np.testing.assert_array_equal(np.vstack([p.repeats for p in pieces]), one.repeats)
    np.testing.assert_array_equal(np.vstack([p.stuck for p in pieces]), one.stuck)
    np.testing.assert_array_equal(parts.to_array(), whole.to_array())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), hold=st.integers(1, 60))
def test_a_hold_is_flagged_exactly_past_its_bound(seed, hold):
    """History that never repeats: L = 0, so a hold of r repeats is flagged from repeat min_repeats + 1 on."""
    rng = np.random.default_rng(seed)
    monitor = StuckMonitor(2, longer_than=2.0, min_repeats=5)
    monitor.update(rng.normal(size=(300, 2)))
    X = rng.normal(size=(hold + 5, 2))
    X[1:hold + 1, 0] = X[0, 0]
    batch = monitor.update(X)
    assert batch.repeats[:hold + 1, 0].tolist() == list(range(hold + 1))
    assert np.flatnonzero(batch.stuck[:, 0]).tolist() == list(range(6, hold + 1))
    assert not batch.stuck[:, 1].any()


def test_unflagged_runs_raise_the_bound_and_flagged_ones_do_not():
    monitor = StuckMonitor(1, longer_than=2.0, min_repeats=3)
    monitor.update(np.array([[1.0], [1.0], [1.0], [2.0]]))           # 2 repeats: not past 3, learned
    assert monitor.longest.tolist() == [2.0] and monitor.bounds.tolist() == [4.0]
    monitor.update(np.array([[5.0]] * 7 + [[6.0]]))                   # 6 repeats: flagged, not learned
    assert monitor.longest.tolist() == [2.0]
    monitor.update(np.array([[6.0]] * 3 + [[7.0]]))                   # 3 repeats after 6.0: learned
    assert monitor.longest.tolist() == [3.0]


def test_missing_values_end_runs_and_warm_up_learns_without_flagging():
    monitor = StuckMonitor(1, min_repeats=2, warmup=10)
    early = monitor.update(np.array([[1.0]] * 8))
    assert not early.stuck.any() and monitor.longest.tolist() == [0.0]
    monitor.update(np.array([[1.0], [np.nan], [1.0]]))                # the warm-up run of 8 ended, learned
    assert monitor.longest.tolist() == [8.0] and monitor.run.tolist() == [0.0]


def test_state_round_trips_mid_run():
    monitor = StuckMonitor(3, longer_than=3.0, min_repeats=4, warmup=5)
    monitor.update(quantised(50, 3))
    restored = StuckMonitor.from_array(monitor.to_array())
    X = quantised(40, 3, seed=1)
    a, b = monitor.update(X), restored.update(X)
    np.testing.assert_array_equal(a.stuck, b.stuck)
    np.testing.assert_array_equal(monitor.to_array(), restored.to_array())


def detector(**overrides):
    return DeviceDetector.create(["cpu", "mem", "disk"], load_config(env={}), warmup=100,
                                 **{"stuck_enabled": True, **overrides})  # off by default (config: stuck.enabled)


def moving(n, seed=0):
    rng = np.random.default_rng(seed)
    load = rng.normal(0.5, 0.1, size=(n, 1))
    return np.hstack([load, 0.5 * load + 0.2, 1.0 - load]) + rng.normal(0, 0.01, size=(n, 3))


def stuck_starts(result):
    """Per reading of a batch, the start of its stuck-metric incident (-1: none); the result's array is empty when
    nothing in the batch is stuck."""
    return result.stuck_incident_starts if result.stuck_incident_starts.size else np.full(len(result.scores), -1)


def stuck_metrics(result):
    return result.stuck_metrics or [[] for _ in result.scores]


def feed(det, X, batch=16):
    """`X` in micro-batches, numbered on from the readings `det` has seen, 5 minutes apart."""
    out = []
    for i in range(0, len(X), batch):
        seqs = np.arange(det.n_seen, det.n_seen + len(X[i:i + batch]))
        out.append(det.process_many(X[i:i + batch], seqs=seqs.tolist(), ts=seqs * 300_000))
    return out


def test_a_stuck_metric_opens_its_own_incident_naming_it_and_leaves_the_scores_alone():
    """A metric held at an ordinary value: flagged past its bound, in an incident of kind stuck that names it and
    how long it held; the score, threshold and score incidents are those of a detector with the monitor off."""
    X = np.vstack([moving(1500), moving(100, seed=1)])
    X[1520:1560, 1] = X[1520, 1]
    on, off = detector(), detector(stuck_enabled=False)
    got, base = feed(on, X), feed(off, X)
    np.testing.assert_array_equal(np.concatenate([r.scores for r in got]), np.concatenate([r.scores for r in base]))
    np.testing.assert_array_equal(np.concatenate([r.thresholds for r in got]),
                                  np.concatenate([r.thresholds for r in base]))
    in_stuck = np.concatenate([stuck_starts(r) for r in got]) >= 0
    assert np.flatnonzero(in_stuck).tolist() == list(range(1526, 1560))  # from the 6th repeat to the end of the hold
    assert np.concatenate([r.is_anomaly for r in got])[in_stuck].all()
    np.testing.assert_array_equal(np.concatenate([r.incident_starts for r in got]),
                                  np.concatenate([r.incident_starts for r in base]))
    stuck = [c for r in got for c in r.incidents if c.kind == STUCK]
    assert stuck[-1].status == "resolved" and stuck[-1].start_seq == 1526 and stuck[-1].end_seq == 1559
    assert stuck[-1].stuck_metrics == (("mem", 39, 0),) and stuck[-1].metrics_to_blame == (("mem", 1.0),)
    assert stuck[-1].record_fields("dev", 0)["incident_id"] == "dev:1526:stuck"
    flagged = got[1530 // 16]
    row = 1530 % 16
    assert stuck_metrics(flagged)[row] == [("mem", 10, 0)] and stuck_starts(flagged)[row] == 1526
    assert sum(c.kind == STUCK for r in base for c in r.incidents) == 0


def test_a_metric_that_holds_still_in_its_history_is_left_alone_until_it_holds_far_longer():
    """An idle counter at 0 for 40 readings in its history (the warm-up): later holds as long are not flagged, one
    beyond twice as long is."""
    X = moving(3000)
    for start in (20, *range(300, 2500, 300)):
        X[start:start + 40, 2] = 0.0
    X[2600:2700, 2] = 0.0
    runs = feed(detector(), X)
    flagged = [stuck_starts(r)[i] for r in runs for i in range(len(r.scores)) if stuck_metrics(r)[i]]
    assert set(flagged) == {2600 + 79}    # 39 repeats before: the bound is 78


def test_only_the_watched_metrics_are_told():
    """`stuck.metrics` names the metrics watched: a hold of another one is not flagged, one of a watched one is."""
    X = np.vstack([moving(1500), moving(100, seed=1)])
    X[1520:1560, 1] = X[1520, 1]
    X[1520:1560, 2] = X[1520, 2]
    flagged = [m for r in feed(detector(stuck_metrics=("disk", "swap")), X) for row in stuck_metrics(r) for m, *_ in row]
    assert set(flagged) == {"disk"}


def test_states_without_a_stuck_monitor_restore_with_one_that_learns_afresh():
    """Checkpoints written before the stuck monitor (format /3) restore; their monitor warms up on its own."""
    from models.serialization import dumps
    det = detector()
    feed(det, moving(600))
    arrays, meta = loads(det.to_bytes())
    settings_ = {k: v for k, v in meta["settings"].items() if not k.startswith("stuck_")}
    old = dumps(arrays[:9] + arrays[11:], {**meta, "architecture": "flead.device-detector/3", "settings": settings_})
    restored = DeviceDetector.from_bytes(old)
    assert restored.n_seen == 600 and restored.stuck.n_seen == 0 and not restored.settings.stuck_enabled
    X = moving(32, seed=3)
    ts = (det.n_seen + np.arange(32)) * 300_000
    np.testing.assert_array_equal(restored.score_many(X, ts=ts), det.score_many(X, ts=ts))
    assert restored.reconfigure(det.settings) and restored.settings.stuck_enabled   # a configuration that turns it on


def test_a_detector_restored_mid_hold_goes_on_with_its_stuck_incident():
    X = np.vstack([moving(1500), moving(100, seed=1)])
    X[1520:1560, 1] = X[1520, 1]
    whole, split = detector(), detector()
    expected = feed(whole, X)
    feed(split, X[:1536])
    restored = DeviceDetector.from_bytes(split.to_bytes())
    assert restored.stuck_incidents.is_open and restored.stuck.n_seen == split.stuck.n_seen
    got = feed(restored, X[1536:])
    assert [c for r in got for c in r.incidents] == [c for r in expected[1536 // 16:] for c in r.incidents]


def test_a_detector_without_the_monitor_keeps_no_state_for_it():
    off = detector(stuck_enabled=False)
    feed(off, moving(300))
    arrays, _ = loads(off.to_bytes())
    assert arrays[9].size == 0 and arrays[10].size == 0
