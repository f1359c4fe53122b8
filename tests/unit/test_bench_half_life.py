"""bench/half_life.py's label-free rule, on series small enough for a unit test."""
import importlib.util
import sys

import numpy as np
import pytest

from config import PROJECT_ROOT, load_config

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the bench imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_half_life", PROJECT_ROOT / "bench" / "half_life.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
METRICS = [f"m{i}" for i in range(4)]
TS = 300_000 * np.arange(3000)  # event times, 5 minutes apart


def series(n: int, shift_at: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(3)
    load = rng.normal(0.5, 0.1, size=(n, 1))
    X = np.hstack([load, 0.8 * load, 1 - load, 0.5 * load]) + rng.normal(0, 0.02, size=(n, 4))
    if shift_at is not None:
        X[shift_at:, 1] += 0.3 * np.linspace(0, 1, n - shift_at)  # one metric drifts away from its peers
    return X


def test_the_prequential_error_is_out_of_sample_and_favours_memory_as_the_data_ask():
    cfg = load_config(env={})
    stationary = [bench.prequential_error(series(3000), TS, METRICS, cfg, h) for h in (500, 0)]
    assert stationary[1] < stationary[0]  # nothing changes: the longest memory predicts best
    assert bench.prequential_error(series(3000), TS, METRICS, cfg, 0) == stationary[1]  # no randomness
    drifting = [bench.prequential_error(series(3000, shift_at=1500), TS, METRICS, cfg, h) for h in (500, 0)]
    assert drifting[0] < drifting[1]  # a relation that keeps moving: a short memory follows it


def test_the_training_fleet_reads_times_and_a_bad_file_exits_with_one_clear_line(tmp_path, capsys):
    from bench_output import training_fleet
    csv = tmp_path / "train.csv"
    csv.write_text("device_id,timestamp,a\n" + "".join(f"d,{1_700_000_000 + 60 * i},{i % 7}\n" for i in range(30))
                   + "e,1700000000,1\n")
    fleet, metrics, path, times = training_fleet(str(csv), 20, "tool", quick=(1, 25))
    assert list(fleet) == ["d"] and fleet["d"].shape == (25, 1) and metrics == ["a"] and path == csv
    assert (np.diff(times["d"]) == 60_000).all() and len(times["d"]) == 25
    assert "left out 1 device(s) with fewer than 20 readings: e" in capsys.readouterr().out
    for bad, minimum in ((tmp_path / "missing.csv", 1), (csv, 1_000)):
        with pytest.raises(SystemExit) as exit_:
            training_fleet(str(bad), minimum, "tool")
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith("tool: ")
