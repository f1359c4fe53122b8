"""evaluate_fleet end to end on a tiny synthetic fleet, and the `flead evaluate` command."""
import json

import numpy as np
import pytest

from models.detector import DeviceDetector
from models.evaluation import ALL_MODELS, evaluate_fleet, operating_threshold, robust_normaliser, split_for_calibration

NAMES = [f"m{i}" for i in range(4)]


def synthetic_fleet(devices=3, seed=0):
    """Metrics driven by two latent factors; anomalies break the correlation of metric m2."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(2, 4))
    train, test = {}, {}
    for d in range(devices):
        scale = 1.0 + d                      # devices differ in scale: pooling must normalise per device
        train[f"dev-{d}"] = scale * (rng.normal(size=(600, 2)) @ mix + 0.05 * rng.normal(size=(600, 4)))
        X = scale * (rng.normal(size=(300, 2)) @ mix + 0.05 * rng.normal(size=(300, 4)))
        y = np.zeros(300, dtype=int)
        X[200:215, 2] += 4 * scale
        y[200:215] = 1
        test[f"dev-{d}"] = (X, y)
    return train, test


@pytest.fixture(scope="module")
def evaluation():
    train, test = synthetic_fleet()
    return evaluate_fleet(train, test, lambda: DeviceDetector.create(NAMES, hidden=[6, 2, 6], seed=0, warmup=20),
                          rounds=3, local_epochs=1, finetune_epochs=1)


def test_every_model_is_reported_with_every_metric(evaluation):
    models = evaluation.report["models"]
    assert set(models) == set(ALL_MODELS) | {"federated_finetuned"}
    for name, m in models.items():
        for key in ("roc_auc", "pr_auc", "f1", "precision", "recall", "best_f1", "f1_pa", "per_device_mean"):
            assert key in m, (name, key)
        assert set(m["per_device"]) == {"dev-0", "dev-1", "dev-2"}
        for device in m["per_device"].values():   # on one device, best F1 bounds the F1 of any one threshold
            assert device["f1"] <= device["best_f1"] + 1e-12


def test_networks_find_the_broken_correlation_and_random_does_not(evaluation):
    models = evaluation.report["models"]
    for name in ("federated", "local", "centralized"):
        assert models[name]["roc_auc"] > 0.85, (name, models[name]["roc_auc"])
    assert abs(models["random"]["roc_auc"] - 0.5) < 0.15


def test_federation_costs_are_reported(evaluation):
    report = evaluation.report
    weights = 2 * (4 * 6 + 6 + 6 * 2 + 2 + 2 * 6 + 6 + 6 * 4 + 4) * 8       # up and down, float64
    assert report["bytes_per_round"] == 3 * weights and report["rounds"] == 3
    assert set(evaluation.scores["federated"]) == {"dev-0", "dev-1", "dev-2"}


def test_calibration_uses_no_labels():
    X = np.arange(100.0)[:, None]
    fit, cal = split_for_calibration(X, 0.2)
    assert len(fit) == 80 and cal[0, 0] == 80           # split in time, calibration last
    normalise = robust_normaliser(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert normalise(np.array([3.0]))[0] == 0.0
    rng = np.random.default_rng(0)
    assert 2.0 < operating_threshold(rng.normal(size=5000), {"kind": "quantile", "target_false_alarm_rate": 0.01}) < 2.6


def test_flead_evaluate_quick_on_a_csv_pair(tmp_path, capsys):
    from orchestration.cli import main
    train, test = synthetic_fleet(devices=2, seed=1)
    header = "device_id,timestamp," + ",".join(NAMES)
    for path, rows in ((tmp_path / "train.csv", {d: (X, None) for d, X in train.items()}),
                       (tmp_path / "test.csv", test)):
        lines = [header + ",label"]
        for d, (X, y) in rows.items():
            for i, x in enumerate(X):
                label = 0 if y is None else int(y[i])
                lines.append(f"{d},{1704067200000 + i * 60000}," + ",".join(f"{v:.6f}" for v in x) + f",{label}")
        path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    code = main(["evaluate", "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
                 "--rounds", "2", "--models", "federated,isolation_forest,random", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"federated", "isolation_forest", "random"}
    assert report["rounds"] == 2 and report["bytes_per_round"] > 0
    assert "| federated |" in capsys.readouterr().out
