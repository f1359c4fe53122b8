"""Evaluation arrays built from the readers."""
import numpy as np
import pytest

from config import load_config
from telemetry.datasets import load_multi_entity, load_nab, load_nsl_kdd

DATA = load_config().data_dir
pytestmark = pytest.mark.skipif(not (DATA / "asd").is_dir(), reason=f"reference data not found in {DATA}")


def test_multi_entity_asd():
    train, test, names = load_multi_entity(DATA / "asd/train.csv.gz", DATA / "asd/test.csv.gz")
    assert names == [f"m{i:02d}" for i in range(19)]
    assert len(train) == len(test) == 12
    X, y = test["omi-1"]
    assert X.shape == (4320, 19) and X.dtype == np.float64 and y.shape == (4320,)
    assert X[0, :3].tolist() == [0.56, 0.5, 0.5] and X[-1, 0] == 0.49
    assert set(np.unique(y)) <= {0, 1} and sum(y.sum() for _, y in test.values()) > 0
    assert all(X.shape[1] == 19 for X in train.values())
    times = {}
    load_multi_entity(DATA / "asd/train.csv.gz", DATA / "asd/test.csv.gz", times=times)
    train_ts, test_ts = times["omi-1"]
    assert len(train_ts) == len(train["omi-1"]) and len(test_ts) == len(X) and train_ts.dtype == np.int64
    assert (np.diff(train_ts) == 300_000).all() and test_ts[0] - train_ts[-1] == 300_000  # every 5 minutes


def test_multi_entity_test_file_needs_labels(tmp_path):
    (tmp_path / "a.csv").write_text("device_id,timestamp,x\nd,2024-01-01T00:00:00Z,1\n")
    with pytest.raises(ValueError, match="no labels for d"):
        load_multi_entity(tmp_path / "a.csv", tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("device_id,timestamp,y,label\nd,2024-01-01T00:00:00Z,1,0\n")
    with pytest.raises(ValueError, match="metric columns differ"):
        load_multi_entity(tmp_path / "a.csv", tmp_path / "b.csv")


def test_nab_split_in_time():
    train, test, names = load_nab(DATA / "nab/realKnownCause", train_fraction=0.15)
    name = "machine_temperature_system_failure"
    n = len(train[name]) + len(test[name][0])
    assert names == ["value"] and len(train[name]) == int(n * 0.15)
    assert train[name][0, 0] == 73.96732207
    assert test[name][1].sum() > 0 and train.keys() == test.keys()
    times = {}
    load_nab(DATA / "nab/realKnownCause", train_fraction=0.15, times=times)
    assert [len(t) for t in times[name]] == [len(train[name]), len(test[name][0])]
    assert times[name][0][-1] < times[name][1][0]


def test_nsl_kdd_clients():
    train, test, names = load_nsl_kdd(DATA / "nsl-kdd/KDDTrain+_20Percent.txt", DATA / "nsl-kdd/KDDTest+.txt",
                                      clients=3, seed=0)
    assert len(names) == 38 and sorted(train) == ["client-0", "client-1", "client-2"]
    assert sum(len(X) for X in train.values()) == 25192 and sum(len(X) for X, _ in test.values()) == 22544
    normal, _, _ = load_nsl_kdd(DATA / "nsl-kdd/KDDTrain+_20Percent.txt", DATA / "nsl-kdd/KDDTest+.txt",
                                clients=3, seed=0, train_normal_only=True)
    assert all(len(normal[d]) < len(train[d]) for d in train)
