"""bench/seasonality.py's figures on series whose cycle is known, and its run on a small CSV."""
import gzip
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from config import PROJECT_ROOT
from models.features import DAY_MS, readings_per_day

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the bench imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_seasonality", PROJECT_ROOT / "bench" / "seasonality.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
FIVE_MINUTES = 300_000


def daily(days: int, step_ms: int = FIVE_MINUTES, period_readings: int | None = None, harmonic: int = 1,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three metrics following a cycle of `period_readings` (default: one day of `step_ms`) in its `harmonic`, one
    constant metric, and their event times from a UTC midnight."""
    per_day = DAY_MS // step_ms
    n = days * per_day
    period = period_readings or per_day
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    wave = np.sin(2 * np.pi * harmonic * t / period)
    X = np.column_stack([wave, 0.5 * wave + 1, -wave, np.full(n, 3.0)]) + rng.normal(0, 0.1, (n, 4)) * [1, 1, 1, 0]
    return X, 1_706_659_200_000 + t * step_ms


def test_readings_per_day_is_read_from_the_median_interval():
    ts = np.arange(0, 10 * FIVE_MINUTES, FIVE_MINUTES)
    assert readings_per_day(ts) == 288
    assert readings_per_day(np.r_[ts, ts[-1] + 7 * FIVE_MINUTES]) == 288  # one gap does not move it
    with pytest.raises(ValueError, match="do not advance"):
        readings_per_day(np.zeros(5))


def test_a_daily_sine_is_seen_as_one_harmonic_with_a_period_of_one_day():
    X, ts = daily(10)
    row = bench.device_row(X, ts, np.random.default_rng(1))
    assert row["metrics_varying"] == 3 and row["readings_per_day"] == 288 and row["days"] == 10
    assert row["acf_1d"] > 0.9 and row["acf_0.5d"] < -0.9
    assert row["profile_share"] > 0.95 and row["profile_share_chance"] < 0.1
    assert row["harmonics_1"] > 0.99
    assert row["cycle_days"] == pytest.approx(1.0, abs=0.01)


def test_a_cycle_in_the_third_harmonic_needs_three_harmonics():
    X, ts = daily(10, harmonic=3)
    row = bench.device_row(X, ts, np.random.default_rng(1))
    assert row["harmonics_1"] < 0.01 and row["harmonics_3"] > 0.99
    assert row["cycle_days"] == pytest.approx(1 / 3, abs=0.01)


def test_timestamps_whose_interval_is_not_the_sampling_interval_show_a_period_far_from_a_day():
    # readings sampled every 5 minutes, stamped one minute apart: the data's day is a fifth of the timestamps'
    X, ts = daily(10, step_ms=60_000, period_readings=288)
    row = bench.device_row(X, ts, np.random.default_rng(1))
    assert row["cycle_days"] == pytest.approx(0.2, abs=0.01)
    assert row["harmonics_4"] < 0.01   # no harmonic the time-of-day inputs can represent holds the cycle


def test_noise_has_no_daily_profile_beyond_chance():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(288 * 10, 3))
    ts = np.arange(len(X)) * FIVE_MINUTES
    row = bench.device_row(X, ts, np.random.default_rng(1))
    assert abs(row["acf_1d"]) < 0.1
    assert row["profile_share"] < 3 * row["profile_share_chance"]


def test_the_bench_writes_its_headline_and_a_row_per_device(tmp_path):
    path = tmp_path / "fleet.csv.gz"
    with gzip.open(path, "wt") as out:
        out.write("device_id,timestamp,a,b,c,d,label\n")
        for device, seed in (("d1", 0), ("d2", 1)):
            X, ts = daily(8, seed=seed)
            for row, t in zip(X, ts):
                stamp = np.datetime64(int(t), "ms").astype(str)[:19] + "Z"
                out.write(f"{device},{stamp}," + ",".join(f"{v:.4f}" for v in row) + ",0\n")
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "seasonality.py"), "--train", str(path),
                             "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the daily profile holds" in result.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    assert [row["device"] for row in out["rows"]] == ["d1", "d2"]
    assert out["headline"]["value"] > 0.9 > out["headline"]["floor"]


def test_an_unreadable_file_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "bench" / "seasonality.py"), "--train",
                             str(tmp_path / "missing.csv")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot read the training data" in result.stderr
