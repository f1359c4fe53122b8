"""bench/fleet_shape.py's synthetic fleet and its counts, on a fleet small enough for a unit test."""
import importlib.util
import sys

import numpy as np

from config import PROJECT_ROOT, load_config

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the bench imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_fleet_shape", PROJECT_ROOT / "bench" / "fleet_shape.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_the_synthetic_fleet_is_seeded_labelled_only_in_its_test_part_and_has_constant_metrics():
    fleet = bench.synthetic_fleet(2, 1_000, 5_000)
    again = bench.synthetic_fleet(2, 1_000, 5_000)
    for (train, test, y), (train2, test2, y2) in zip(fleet.values(), again.values()):
        assert train.shape == (1_000, bench.METRICS) and test.shape == (5_000, bench.METRICS) and y.shape == (5_000,)
        assert np.array_equal(train, train2) and np.array_equal(test, test2) and np.array_equal(y, y2)
        assert 0 < y.mean() < 0.5                       # injected ranges, in the test part only
        assert (train.std(axis=0) == 0).sum() == bench.CONSTANT_METRICS


def test_counts_of_a_run_are_consistent():
    cfg = load_config(env={})
    fleet = bench.synthetic_fleet(1, 1_500, 1_500)
    metrics = [f"m{i:02d}" for i in range(bench.METRICS)]
    fixed, per_input = (bench.run(fleet, metrics, cfg, w) for w in (0.0, 5.0))
    for fig in (fixed, per_input):
        assert 0 <= fig["lone_flag_incidents_on_a_range"] <= fig["lone_flag_incidents"] <= fig["incidents"]
        assert 0 <= fig["train_flag_rate"] < 0.2 and fig["false_drifts"] >= 0
    # 200 inputs (38 metrics and the time of day, window 5): no flag before reading 1,000 with 5 per input, so no
    # more training flags than the target rate or than with a warm-up of 200 readings
    assert per_input["train_flag_rate"] <= max(fixed["train_flag_rate"], cfg.threshold.target_false_alarm_rate)


def test_the_synthetic_fleet_written_as_csv_reads_back_as_flead_evaluate_reads_a_fleet(tmp_path):
    from telemetry.datasets import device_arrays
    from telemetry.readers import MultiEntityCsvReader
    fleet = bench.synthetic_fleet(2, 400, 400)
    bench.write_csv(fleet, tmp_path)
    for part in ("train", "test"):
        read = device_arrays(MultiEntityCsvReader(tmp_path / f"{part}.csv.gz"))
        assert set(read) == set(fleet)
        for device, (X, y) in read.items():
            X_train, X_test, y_test = fleet[device]
            np.testing.assert_allclose(X, X_train if part == "train" else X_test)
            if part == "test":
                assert np.array_equal(np.asarray(y), y_test)
