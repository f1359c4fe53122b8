"""`storage.summaries`: the fleet overview's summary documents, merged generation by generation and write by write,
equal what a rebuild from everything stored gives."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from storage.rollups import Level, RollupAccumulator
from storage.schemas import check_document
from storage.summaries import (device_document, device_entries, generation_stats, merge_devices, merge_incidents,
                                merge_series, rank_devices)

LEVELS = [Level("daily_rollups", "scores", True, 86_400_000), Level("fleet_rollups", "scores", False, 600_000),
          Level("score_rollups", "scores", True, 3_600_000), Level("metric_rollups", "readings", True, 21_600_000)]
readings = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 10 * 86_400_000), st.booleans(),
                              st.integers(1, 4)), max_size=80)


def _accumulated(rows) -> RollupAccumulator:
    acc = RollupAccumulator(LEVELS)
    for device in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == device]
        acc.add_scores(device, {"ts": np.array([r[1] for r in mine], dtype=np.int64),
                                "score": np.array([r[1] % 97 / 10 for r in mine]),
                                "threshold": np.array([np.nan if r[3] == 2 else 1.0 for r in mine]),
                                "is_anomaly": np.array([r[2] for r in mine], dtype=np.uint8)})
        values = np.array([[r[1] % 13, np.nan if r[2] else r[3]] for r in mine], dtype=np.float64)
        acc.add_readings(device, np.array([r[1] for r in mine], dtype=np.int64), ("m0", "m1"), values)
    return acc


def _totals(stats) -> dict:
    return {device: tuple(e["totals"]) for device, e in device_entries(stats).items()}


@settings(max_examples=150, deadline=None)
@given(readings, st.integers(1, 4))
def test_generations_merged_one_by_one_equal_all_at_once(rows, keep):
    series, ranked, totals = [], [], {}
    for generation in (1, 2, 3, 4):
        stats = _accumulated([r for r in rows if r[3] == generation]).stats
        added = {d: tuple(np.add(totals.get(d, (0, 0)), t)) for d, t in _totals(stats).items()}
        totals |= added
        series, ranked = merge_series(series, generation_stats(stats), 10**15), merge_devices(ranked, added, keep)
    stats = _accumulated(rows).stats
    assert series == merge_series([], generation_stats(stats), 10**15)
    assert ranked == merge_devices([], _totals(stats), keep) == rank_devices(
        [{"device_id": d, "n": n, "anomalies": a} for d, (n, a) in totals.items()], keep)
    assert len(ranked) == min(keep, len({r[0] for r in rows}))
    assert sum(b["n"] for b in series) == sum(n for n, _ in totals.values()) == len(rows)
    assert sum(b["anomalies"] for b in series) == sum(r[2] for r in rows)


def test_devices_are_ranked_by_anomalous_readings_then_readings_and_only_the_first_kept():
    ranked = merge_devices([], {"a": (10, 1), "b": (5, 3), "c": (20, 1), "d": (1, 0)}, keep=3)
    assert [e["device_id"] for e in ranked] == ["b", "c", "a"]
    assert [e["device_id"] for e in merge_devices(ranked, {"d": (2, 2)}, keep=3)] == ["b", "d", "c"]


@settings(max_examples=150, deadline=None)
@given(readings, st.sampled_from([10**15, 2 * 86_400_000]))
def test_device_summaries_merged_generation_by_generation_equal_one_built_from_everything(rows, horizon_ms):
    docs: dict[str, dict] = {}
    for generation in (1, 2, 3, 4):
        for device, added in device_entries(_accumulated([r for r in rows if r[3] == generation]).stats).items():
            docs[device] = device_document(device, docs.get(device, {}), added, generation, horizon_ms)
    whole = {device: device_document(device, {}, added, 4, horizon_ms)
             for device, added in device_entries(_accumulated(rows).stats).items()}
    assert sorted(docs) == sorted(whole) == sorted({r[0] for r in rows})
    for device, doc in docs.items():
        for field in ("scores", "metrics"):
            assert [{k: pytest.approx(v) for k, v in e.items()} for e in doc[field]] == whole[device][field]
        mine = [r for r in rows if r[0] == device]
        assert (doc["n"], doc["anomalies"]) == (len(mine), sum(r[2] for r in mine))
        if horizon_ms > 10**14:  # everything kept: counts add up to the rows
            assert sum(e["n"] for e in doc["scores"]) == len(mine)
            assert sum(e["n"] for e in doc["metrics"] if e["name"] == "m1") == sum(not r[2] for r in mine)
        else:
            assert doc["scores"][0]["ts"] >= doc["scores"][-1]["ts"] - horizon_ms
        check_document("device_summary", doc)


def test_series_keeps_only_the_horizon_before_its_newest_bucket():
    series = merge_series([], {0: (1, 0), 600: (2, 1), 1800: (3, 3)}, horizon_ms=1200)
    assert [b["ts"] for b in series] == [600, 1800]
    assert merge_series(series, {3600: (1, 0)}, horizon_ms=1200) == [{"ts": 3600, "n": 1, "anomalies": 0}]


def _incident(device, start, status, end=None):
    return {"incident_id": f"{device}:{start}", "device_id": device, "status": status, "start_ts": start,
            "end_ts": end or start + 60, "n_flagged": 2, "peak_ratio": 1.5, "peak_score": 3.0}


def test_open_count_follows_each_incidents_newest_state_and_the_timeline_keeps_the_newest():
    summary = merge_incidents({}, [_incident("a", 10, "open"), _incident("b", 20, "open"),
                                   _incident("c", 5, "resolved")], keep=2, devices=10)
    assert summary["open_incidents"] == 2 and summary["open"] == ["a:10", "b:20"]
    assert [e["incident_id"] for e in summary["newest"]] == ["b:20", "a:10"]  # newest 2 by start
    summary = merge_incidents(summary, [_incident("a", 10, "resolved", end=99), _incident("a", 30, "open")], keep=2, devices=10)
    assert summary["open"] == ["a:30", "b:20"] and summary["open_incidents"] == 2
    assert [(e["incident_id"], e["status"]) for e in summary["newest"]] == [("a:30", "open"), ("b:20", "open")]
    summary = merge_incidents(summary, [_incident("b", 20, "resolved")], keep=2, devices=10)
    assert summary["open_incidents"] == 1 and summary["newest"][1]["status"] == "resolved"
    check_document("fleet_summary", summary | {"updated_at": 0})


def test_the_timeline_keeps_only_the_devices_whose_incidents_started_last():
    """A timeline has a row per device: beyond `devices` rows the names overlap, so it shows those devices whose
    incidents started last, each with all of its kept incidents; the open count still covers every device."""
    written = [_incident(f"d{i}", 100 + i, "open") for i in range(6)] + [_incident("d5", 50, "resolved")]
    summary = merge_incidents({}, written, keep=10, devices=2)
    assert [e["incident_id"] for e in summary["newest"]] == ["d5:105", "d4:104", "d5:50"]
    assert summary["open_incidents"] == 6
    summary = merge_incidents(summary, [_incident("d0", 200, "open")], keep=10, devices=2)
    assert {e["device_id"] for e in summary["newest"]} == {"d0", "d5"}
