"""bench/injected.py's injections (where, what, labelled as what) and one small run of the yardstick."""
import importlib.util
import sys

import numpy as np
import pytest

from config import PROJECT_ROOT, load_config

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the bench imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_injected", PROJECT_ROOT / "bench" / "injected.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
METRICS = [f"m{i}" for i in range(4)]


def series(n: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    load = rng.normal(0.5, 0.1, size=(n, 1))
    X = np.hstack([load, 0.8 * load, 1 - load, np.zeros((n, 1))]) + rng.normal(0, 0.02, size=(n, 4))
    X[:, 3] = 7.0  # a constant metric: never chosen (it carries no anomaly)
    return X


def test_ranges_are_apart_and_inside():
    rng = np.random.default_rng(0)
    for _ in range(20):
        taken = bench.places(rng, 500, 4, (10, 60))
        assert len(taken) == 4
        for (s1, l1), (s2, l2) in zip(taken, taken[1:]):
            assert s1 + l1 + max(l1, l2) <= s2  # apart by the longer of the two
        assert all(0 <= s and s + length <= 500 for s, length in taken)
    assert bench.places(rng, 5, 3, (10, 60)) == []  # nothing fits


@pytest.mark.parametrize("kind", bench.KINDS)
def test_each_kind_changes_exactly_the_labelled_readings_of_moving_metrics(kind):
    history, probe = series(2000), series(600, seed=4)
    X, y = bench.inject(kind, history, probe, np.random.default_rng(1), half_day=144)
    changed = np.any(X != probe, axis=1)
    assert y.sum() > 0 and not changed[y == 0].any()           # nothing outside the labels is touched
    assert changed[y == 1].mean() > (0.5 if kind == "stuck" else 0.9)  # stuck: the range's first reading stays
    assert (X[:, 3] == 7.0).all()                               # the constant metric is never chosen
    runs = np.diff(np.r_[0, y, 0])
    lengths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    expected = (1, 1) if kind == "spike" else bench.RANGE_READINGS
    assert lengths.min() >= expected[0] and lengths.max() <= expected[1]
    if kind == "stuck":   # held at the value of its first reading
        start = int(np.flatnonzero(runs == 1)[0])
        cols = np.flatnonzero(X[start + 1] != probe[start + 1])
        assert cols.size and (X[start:start + lengths[0], cols] == probe[start, cols]).all()


def test_a_seasonal_range_is_every_metric_half_a_day_earlier():
    history, probe = series(2000), series(600, seed=4)
    X, y = bench.inject("seasonal", history, probe, np.random.default_rng(1), half_day=144)
    whole = np.concatenate([history, probe])
    rows = np.flatnonzero(y)
    assert rows.size and np.array_equal(X[rows], whole[len(history) + rows - 144])   # the relations are kept
    with pytest.raises(ValueError, match="half a day"):
        bench.inject("seasonal", history, probe, np.random.default_rng(1))
    fleet = {"a": series(3000)}
    times = {"a": 60_000 * np.arange(3000)}          # every minute: half a day is 720 readings
    _, test = bench.split(fleet, "seasonal", times=times)
    X, y = test["a"]
    rows = np.flatnonzero(y)
    assert rows.size and np.array_equal(X[rows], fleet["a"][2100 + rows - 720])


def test_the_existing_kinds_are_seeded_as_before_the_seasonal_kind():
    assert bench.KINDS[:6] == ("spike", "level", "noise", "decoupled", "stuck", "trend")   # seeded by position


def test_the_split_is_seeded_per_kind_and_history_can_be_short():
    fleet = {"a": series(3000), "b": series(3000, seed=5)}
    train, test = bench.split(fleet, "level")
    again, test_again = bench.split(fleet, "level")
    assert len(train["a"]) == int(bench.PROBE_START * 3000) and len(test["a"][0]) == 3000 - len(train["a"])
    assert all(np.array_equal(test[d][1], test_again[d][1]) for d in fleet)
    young, _ = bench.split(fleet, "level", history=500)
    assert len(young["a"]) == 500 and np.array_equal(young["a"], train["a"][-500:])
    times = {"a": np.arange(len(fleet["a"]))}
    for history in (0, 500):   # the times are cut as the readings are
        (past, probe), = bench.split_times(times, history).values()
        cut, _ = bench.split(fleet, "level", history=history)
        assert len(past) == len(cut["a"]) and past[-1] + 1 == probe[0] and probe[-1] == len(fleet["a"]) - 1


def test_a_detector_finds_injected_level_shifts_and_random_does_not():
    fleet = {"a": series(3000), "b": series(3000, seed=5)}
    times = {device: 300_000 * np.arange(3000) for device in fleet}  # every 5 minutes
    report = bench.run_kind(fleet, METRICS, load_config(env={}), "level", ("local", "random"), times=times)
    assert report["models"]["local"]["roc_auc"] > 0.9
    assert abs(report["models"]["random"]["roc_auc"] - 0.5) < 0.1
