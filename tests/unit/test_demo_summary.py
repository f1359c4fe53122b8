"""The demo summary's live accuracy: incident figures from score records as they arrive (any order), and the
offline reference beside them."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from config import PROJECT_ROOT, load_config
from models.metrics import event_counts, event_metrics
from orchestration.demo import (DRIFT_NOISE_SDS, _wait_for, drift_summary, drifting_copies, incident_quality,
                                offline_reference, print_summary)


def records(device: str, labels: list[int], flags: list[int]) -> list[dict]:
    return [{"device_id": device, "seq": seq, "label": y, "is_anomaly": bool(f),
             "incident_id": f"{device}:x" if f else None} for seq, (y, f) in enumerate(zip(labels, flags))]


def test_incident_figures_pool_devices_in_seq_order_whatever_the_arrival_order():
    a = records("a", [0, 1, 1, 0, 0, 0, 0, 1, 0, 0], [0, 1, 0, 1, 0, 0, 0, 0, 0, 1])
    b = records("b", [0, 0, 1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    arrived = a + b
    random.Random(3).shuffle(arrived)
    got = incident_quality(arrived, gap_readings=1)
    counts = [event_counts(np.array([r["label"] for r in rs]), np.array([r["is_anomaly"] for r in rs]), 1)
              for rs in (a, b)]
    expected = event_metrics({k: counts[0][k] + counts[1][k] for k in counts[0]})
    assert got["incident_f1"] == pytest.approx(expected["incident_f1"])
    assert got["composite_f1"] == pytest.approx(expected["composite_f1"])
    # a: incidents [1,4) true (flags 1 and 3, gap 1), [9,10) false; ranges [1,3) found, [7,8) missed.
    # b: incident [0,1) false, range [2,5) missed.
    assert (got["incidents"], got["false_incidents"], got["ranges"], got["detected_ranges"]) == (3, 2, 3, 1)
    assert got["incident_precision"] == pytest.approx(1 / 3) and got["incident_recall"] == pytest.approx(1 / 3)
    assert got["stream_incident_ids"] == 2


def test_no_labelled_records_give_no_incident_figures():
    assert incident_quality([], gap_readings=10) == {}


def test_offline_reference_is_the_stored_federated_row_or_none():
    ref = offline_reference("asd")
    assert ref["source"] == "docs/results/asd.json" and 0 < ref["f1"] < 1 and 0 < ref["incident_f1"] < 1
    assert offline_reference("no-such-dataset") is None


def test_the_latency_line_says_whether_the_replay_was_paced(capsys):
    summary = json.loads((PROJECT_ROOT / "tests" / "unit" / "data" / "demo_summary.json").read_text())  # a real one
    print_summary({**summary, "replay_rate": None})
    assert "replayed as fast as possible, so mostly time queued" in capsys.readouterr().out
    print_summary({**summary, "replay_rate": 5000.0})
    assert "replayed at 5,000 readings/s" in capsys.readouterr().out


def test_a_wait_reports_its_progress_once_when_it_ends_and_not_when_nothing_was_waited_for():
    lines = []
    checks = iter([False, False, True])
    _wait_for(lambda: next(checks), 10, "two checks", progress=lambda: lines.append("progress"))
    assert lines == ["progress"]
    _wait_for(lambda: True, 10, "nothing", progress=lambda: lines.append("again"))
    assert lines == ["progress"]
    with pytest.raises(SystemExit, match="timed out after 0 s waiting for never"):
        _wait_for(lambda: False, 0, "never")
    _wait_for(lambda: False, 0, "never", required=False)  # a wait that may end without its condition


def test_the_demo_counts_only_score_messages_signed_by_the_job():
    from types import SimpleNamespace

    from models.integrity import sign_message
    from orchestration.demo import ScoreWatch, ScoreWatcher
    from telemetry.schema import encode_scores

    key = bytes(range(32))
    batch = encode_scores("d-1", 1, 0, 1_000, [{"seq": 3, "score": 0.5}])
    message = lambda value, error=None: SimpleNamespace(value=lambda: value, error=lambda: error)  # noqa: E731
    watcher = SimpleNamespace(key=key, watch=ScoreWatch())
    records = ScoreWatcher.genuine_records(watcher, [message(sign_message(batch, key)), message(batch),
                                                     message(sign_message(batch, bytes(32))), message(None, "EOF")])
    assert [r["seq"] for r in records] == [3]
    assert watcher.watch.refused == 2


def test_the_demo_starts_over_only_on_what_the_last_demo_left():
    from orchestration.demo import start_plan

    empty, stored = {"messages": 0, "readings": 0}, {"messages": 12, "readings": 30}
    assert start_plan(empty, None, False, "var") == "fresh"
    assert start_plan(stored, dict(stored), False, "var") == "start over"
    assert start_plan(stored, {}, False, "var") == "start over"  # a demo that did not finish
    assert start_plan(stored, None, True, "var") == "start over"  # --reset
    with pytest.raises(SystemExit, match="holds data .12 messages; 30 readings. that no demo left. The demo"):
        start_plan(stored, None, False, "var")
    with pytest.raises(SystemExit, match=r"more was added since the last demo.*--reset"):
        start_plan(stored, {"messages": 12, "readings": 20}, False, "var")


def test_the_demo_lowers_the_snapshot_cadence_to_its_shortest_training_part():
    """Its round follows the training part: a device with fewer training readings than stream.snapshot_every
    would send no snapshot before it (the demo waited for one until its timeout)."""
    from types import SimpleNamespace

    from config import load_config
    from orchestration.demo import _snapshot_by_end_of_training

    cfg = load_config(env={})
    every = cfg.stream.snapshot_every
    train = [SimpleNamespace(device_id=d) for d, n in (("a", every + 50), ("b", every - 200)) for _ in range(n)]
    lines = []
    assert _snapshot_by_end_of_training(cfg, train, lines.append).stream.snapshot_every == every - 200
    assert lines and "snapshot" in lines[0]
    long_enough = [r for r in train if r.device_id == "a"]
    assert _snapshot_by_end_of_training(cfg, long_enough, lines.append) is cfg


def test_the_demo_widens_the_dashboards_time_span_to_its_test_part():
    """The charts over time show the newest rollups.recent_s of event time (a week); the demo's incidents are
    anywhere in its test part, so it widens that to the longest device's test part (whole days, capped)."""
    from types import SimpleNamespace

    from config import load_config
    from orchestration.demo import DAY_S, DEMO_MAX_RECENT_DAYS, _dashboards_cover_the_test_part

    cfg = load_config(env={})
    start = 1_706_659_200_000  # 2024-01-31
    five_min = 300_000

    def test_part(days_by_device):
        return [SimpleNamespace(device_id=d, ts=start + i * five_min)
                for d, days in days_by_device for i in range(int(days * DAY_S * 1000 / five_min))]

    lines = []
    wider = _dashboards_cover_the_test_part(cfg, test_part([("a", 15), ("b", 3)]), lines.append)
    assert wider.rollups.recent_s == 16 * DAY_S  # 15 days less 5 minutes, rounded up, plus one
    assert lines and "recent_s" in lines[0] and "16 days" in lines[0]
    assert cfg.rollups.recent_s < wider.rollups.recent_s
    assert _dashboards_cover_the_test_part(cfg, test_part([("a", 2)]), lines.append) is cfg  # a week covers it
    capped = _dashboards_cover_the_test_part(cfg, test_part([("a", 400)])[::50], lines.append)
    assert capped.rollups.recent_s == DEMO_MAX_RECENT_DAYS * DAY_S


def test_the_summary_names_each_of_the_strongest_incidents_once(capsys):
    """Five alerts of one incident are one line: its peak, its number of alerts and their seqs; a flag without an
    incident id stands alone; an unflagged record is no alert however high its score."""
    from orchestration.demo import strongest_incidents

    def alert(device, seq, times, incident, flagged=True):
        return {"device_id": device, "seq": seq, "ts": 1_000 * seq, "score": times * 2.0, "threshold": 2.0,
                "is_anomaly": flagged, "incident_id": incident, "top_metrics": [{"metric": f"m{seq % 3}"}]}

    records = ([alert("a", seq, 100 + seq, "a:1") for seq in range(10, 15)] + [alert("a", 40, 50, "a:2"),
               alert("b", 7, 80, None), alert("b", 8, 500, None, flagged=False), alert("c", 3, 20, "c:1")])
    top = strongest_incidents(records, n=3)
    assert [(t["device_id"], t["seq"], t["alerts"], t["first_seq"], t["last_seq"]) for t in top] == [
        ("a", 14, 5, 10, 14), ("b", 7, 1, 7, 7), ("a", 40, 1, 40, 40)]
    assert top[0]["score_over_threshold"] == 114.0 and top[0]["metrics"] == ["m2"]
    summary = json.loads((PROJECT_ROOT / "tests" / "unit" / "data" / "demo_summary.json").read_text())
    print_summary({**summary, "strongest_incidents": top})
    out = capsys.readouterr().out
    assert top[0]["first_ts"] == 10_000  # the incident's first alert, not its peak
    assert ("incident a from 1970-01-01 00:00:10 UTC, seq 10-14, 5 alerts: peak 114x threshold (seq 14), "
            "metrics to blame: m2") in out
    assert "incident b from 1970-01-01 00:00:07 UTC, seq 7, 1 alert: peak 80x threshold (seq 7)" in out
    print_summary({**summary, "strongest_incidents": [{**top[0], "score_over_threshold": 1765.03},
                                                      {**top[1], "score_over_threshold": 8.4712}]})
    out = capsys.readouterr().out  # 3 significant figures, as the dashboards print; thousands separated
    assert "peak 1,765x threshold" in out and "peak 8.47x threshold" in out


def synthetic_device(device: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list, list]:
    """A server's training and test readings: 6 metrics driven by 2 load factors, one constant metric."""
    from telemetry.schema import Reading

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    load = rng.normal(size=(n, 2)) @ rng.normal(size=(2, 6)) * 0.1 + 0.5 + rng.normal(0, 0.01, size=(n, 6))
    names = [f"m{i}" for i in range(7)]
    readings = [Reading(device, seq, 1_000 * seq, {**dict(zip(names, map(float, row))), "m6": 1.0},
                        label=0 if seq >= n_train else None) for seq, row in enumerate(load)]
    return readings[:n_train], readings[n_train:]


def test_a_drifting_copy_changes_every_second_varying_metric_from_the_middle_of_its_test_part_only():
    train, test = synthetic_device("a", 1000, 600)
    copies = drifting_copies(train, test, 1)
    (copy,) = copies.devices
    assert copy == {"device_id": "a-drifting", "source": "a", "changed_from_seq": 1300,
                    "metrics": ["m0", "m2", "m4"]}  # m6 is constant: no unit to scale noise by
    assert [(r.seq, r.ts, r.metrics) for r in copies.train] == [(r.seq, r.ts, r.metrics) for r in train]
    assert {r.device_id for r in copies.train + copies.test} == {"a-drifting"}
    assert all(r.label is None for r in copies.test)  # counts in no accuracy figure
    before = [(c.metrics, r.metrics) for c, r in zip(copies.test, test) if r.seq < 1300]
    assert all(c == r for c, r in before) and len(before) == 300
    after = np.array([[c.metrics[m] - r.metrics[m] for m in sorted(r.metrics)]
                      for c, r in zip(copies.test, test) if r.seq >= 1300])
    spread = np.std([[r.metrics[m] for m in sorted(r.metrics)] for r in train], axis=0)
    assert np.all(after[:, [1, 3, 5, 6]] == 0)
    assert np.allclose(after[:, [0, 2, 4]].std(axis=0) / spread[[0, 2, 4]], DRIFT_NOISE_SDS, rtol=0.25)
    assert drifting_copies(train, test, 0).devices == []


def test_the_detector_declares_a_drift_on_a_drifting_copy_and_its_flag_rate_comes_back():
    """What the demo shows: the change is a new normal, so the drift monitor declares it within a few hundred
    readings and the device re-baselines (its flag rate back near the target), while the unchanged source
    declares none."""
    from models.detector import DeviceDetector

    train, test = synthetic_device("a", 2000, 3000)
    copies = drifting_copies(train, test, 1)
    names = list(train[0].metrics)
    for readings, changed_from in ((train + test, None), (copies.train + copies.test, 3500)):
        X = np.array([[r.metrics[m] for m in names] for r in readings])
        detector = DeviceDetector.create(names, load_config())
        drifts, flags = [], []
        for i in range(0, len(X), 16):
            result = detector.process_many(X[i:i + 16], seqs=list(range(i, min(i + 16, len(X)))),
                                           ts=[r.ts for r in readings[i:i + 16]])
            flags.append(result.is_anomaly)
            if result.drift is not None:
                drifts.append(result.drift.seq)
        if changed_from is None:
            assert drifts == []
        else:
            assert len(drifts) >= 1 and changed_from < drifts[0] < changed_from + 600, drifts
            assert np.concatenate(flags)[-500:].mean() < 0.03


def test_the_summary_says_where_a_drift_was_declared_and_where_not(capsys):
    copies = [{"device_id": "b-drifting", "source": "b", "changed_from_seq": 1500, "metrics": ["m0", "m2"]},
              {"device_id": "c-drifting", "source": "c", "changed_from_seq": 1500, "metrics": ["m1"]}]
    events = [{"device_id": "b-drifting", "seq": 1731}, {"device_id": "a", "seq": 90}]
    drift = drift_summary(copies, events)
    assert [c["declared_at_seqs"] for c in drift["copies"]] == [[1731], []]
    assert drift["events"] == 2 and drift["events_on_other_devices"] == 1
    summary = json.loads((PROJECT_ROOT / "tests" / "unit" / "data" / "demo_summary.json").read_text())
    print_summary({**summary, "drift": drift})
    out = capsys.readouterr().out
    assert ("drift        b-drifting (a copy of b with 2 metrics noisier from seq 1,500 on, a new normal): drift "
            "declared at seq 1,731, and the device re-baselined") in out
    assert "c-drifting (a copy of c with 1 metrics noisier from seq 1,500 on, a new normal): no drift declared" in out
    assert "drift        2 drift event(s) stored; 1 on the data set's own devices" in out



def test_paged_incidents_follow_the_routers_rule():
    from orchestration.demo import paged_incidents

    def flag(device, seq, label, incident, score):
        return {"device_id": device, "seq": seq, "label": label, "is_anomaly": True, "incident_id": incident,
                "score": score, "threshold": 1.0}
    labelled = [flag("a", 1, 0, "a:1", 1.2),                            # a lone flag: held back
                flag("a", 9, 1, "a:9", 1.1), flag("a", 10, 1, "a:9", 1.3),  # two flags on a range: pages
                flag("b", 4, 0, "b:4", 7.0),                            # one critical flag: pages
                {"device_id": "b", "seq": 5, "label": 1, "is_anomaly": False, "incident_id": None,
                 "score": 0.5, "threshold": 1.0}]
    assert paged_incidents(labelled, 2, 3.0) == {"paged_incidents": 2, "paged_on_a_range": 1,
                                                 "paging_rule": "2 or more flagged readings, or a peak of 3× the "
                                                                "threshold"}
    assert paged_incidents(labelled, 1, 3.0)["paged_incidents"] == 3


def test_the_incidents_line_says_how_many_page_when_known(capsys):
    summary = json.loads((PROJECT_ROOT / "tests" / "unit" / "data" / "demo_summary.json").read_text())
    print_summary(summary)  # a summary of before the paging figures: the line without them
    assert "of them page" not in capsys.readouterr().out
    paged = {"paged_incidents": 7, "paged_on_a_range": 5, "paging_rule": "2 or more flagged readings, or a peak of "
                                                                          "3× the threshold"}
    print_summary({**summary, "incident_accuracy": {**summary["incident_accuracy"], **paged}})
    assert "; 7 of them page (2 or more flagged readings, or a peak of 3× the threshold), 5 of those with an alert " \
           "in a labelled range" in capsys.readouterr().out
