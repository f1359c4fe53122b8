"""bench/units.py's variants of a data set, built without labels (no evaluation run here)."""
import importlib.util
import sys

import numpy as np
import pandas as pd

from config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # bench/units.py imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_units", PROJECT_ROOT / "bench" / "units.py")
bench_units = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_units)


def table(devices: int, rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = [pd.DataFrame({"device_id": f"d{i}", "timestamp": np.arange(rows), "m0": rng.random(rows),
                            "m1": rng.random(rows), "label": 0}) for i in range(devices)]
    return pd.concat(frames, ignore_index=True)


def test_the_variants_keep_the_labels_and_change_what_they_say():
    train, test = table(6, 2_500, 0), table(6, 2_500, 1)
    test.loc[test.index % 97 == 0, "label"] = 1
    variants = bench_units.variants(train, test)
    units_train, units_test = variants["units"]
    ratio = units_train[["m0", "m1"]].to_numpy() / np.maximum(train[["m0", "m1"]].to_numpy(), 1e-9)
    assert not np.allclose(ratio, 1.0)  # another unit
    assert (units_test["label"] == test["label"]).all()
    shape_train, _ = variants["shape"]
    assert {"const_zero", "const_big", "flat_mostly"} <= set(shape_train.columns)
    gaps_train, gaps_test = variants["gaps"]
    missing = gaps_test[["m0", "m1"]].isna().to_numpy().mean()
    assert 0.5 * bench_units.MISSING_SHARE < missing < 2 * bench_units.MISSING_SHARE
    sizes = gaps_train.groupby("device_id").size()
    assert (sizes == bench_units.SHORT_TRAINING_ROWS).sum() == bench_units.SHORT_DEVICES
    outage = bench_units.OUTAGE[1] - bench_units.OUTAGE[0]
    assert sorted(gaps_test.groupby("device_id").size().tolist()) == [2_500 - outage] * 2 + [2_500] * 4
    kept = gaps_test.set_index(["device_id", "timestamp"])["label"]
    assert (kept == test.set_index(["device_id", "timestamp"])["label"].loc[kept.index]).all()
