"""evaluate_fleet end to end on a tiny synthetic fleet, and the `flead evaluate` command."""
import json

import numpy as np
import pytest

from config import load_config
from models.detector import DeviceDetector
from models.evaluation import (ALL_MODELS, evaluate_fleet, operating_threshold, robust_normaliser, rolling_robust_z,
                               split_for_calibration)

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


def times(train, test):
    """Every device's event times (training, test), a reading every 5 minutes."""
    return {d: (300_000 * np.arange(len(train[d])), 300_000 * np.arange(len(train[d]), len(train[d]) + len(test[d][0])))
            for d in train}


@pytest.fixture(scope="module")
def evaluation():
    """The stream protocol (the default) with the default detector (subspace), every model."""
    train, test = synthetic_fleet()
    return evaluate_fleet(train, test, lambda: DeviceDetector.create(NAMES, load_config(env={}), warmup=50, seed=0), micro_batch=16,
                          round_every=100, times=times(train, test))


@pytest.fixture(scope="module")
def batch_evaluation():
    train, test = synthetic_fleet()
    return evaluate_fleet(train, test, lambda: DeviceDetector.create(NAMES, load_config(env={}), kind="ae", hidden=[6, 2, 6], seed=0, time_of_day=False,
                                                                    warmup=20),
                          rounds=3, local_epochs=1, finetune_epochs=1, protocol="batch",
                          models=("federated", "local", "centralized", "random"))


METRICS = ("roc_auc", "pr_auc", "f1", "precision", "recall", "best_f1", "f1_pa", "incident_precision",
           "incident_recall", "incident_f1", "composite_f1", "per_device_mean")


def test_every_model_is_reported_with_every_metric(evaluation, batch_evaluation):
    assert set(evaluation.report["models"]) == set(ALL_MODELS)
    assert set(batch_evaluation.report["models"]) == {"federated", "federated_finetuned", "local", "centralized",
                                                      "random"}
    for report in (evaluation.report, batch_evaluation.report):
        for name, m in report["models"].items():
            for key in METRICS:
                assert key in m, (name, key)
            assert set(m["per_device"]) == {"dev-0", "dev-1", "dev-2"}
            for device in m["per_device"].values():   # on one device, best F1 bounds the F1 of any one threshold
                assert device["f1"] <= device["best_f1"] + 1e-12
    for name in ("federated", "local", "centralized"):  # stream detectors: own flags, and the baselines' rule
        assert "f1_calibration_rule" in evaluation.report["models"][name]
        assert evaluation.report["models"][name]["protocol"] == "stream"


def test_detectors_find_the_broken_correlation_and_random_does_not(evaluation, batch_evaluation):
    for report in (evaluation.report, batch_evaluation.report):
        models = report["models"]
        for name in ("federated", "local", "centralized"):
            assert models[name]["roc_auc"] > 0.85, (name, models[name]["roc_auc"])
        assert abs(models["random"]["roc_auc"] - 0.5) < 0.15
    stream = evaluation.report["models"]
    for name in ("federated", "local"):   # every anomalous range is found, as one incident or a few
        assert stream[name]["incident_recall"] == 1.0 and stream[name]["composite_f1"] > 0.3, stream[name]


def test_federation_costs_are_reported(evaluation, batch_evaluation):
    report = batch_evaluation.report
    weights = 2 * (4 * 6 + 6 + 6 * 2 + 2 + 2 * 6 + 6 + 6 * 4 + 4) * 8       # up and down, float64
    assert report["bytes_per_round"] == 3 * weights and report["rounds"] == 3
    federated = evaluation.report["models"]["federated"]
    # 900 readings per device, a round every 100: 8 rounds; the subspace snapshot is a float32 factor (30 inputs:
    # 4 metrics and the time of day's 2 x a window of 5; rank 16), mean and variances, plus its header, up and down
    # for 3 devices.
    assert federated["rounds"] == 8
    assert report["model_bytes"] == weights // 2
    assert evaluation.report["model_bytes"] == (30 * 16 + 30 + 30) * 4
    assert 3 * 2 * evaluation.report["model_bytes"] < federated["bytes_per_round"] < 3 * 2 * 2000 * 4
    assert set(evaluation.scores["federated"]) == {"dev-0", "dev-1", "dev-2"}


def test_each_devices_components_are_reported_and_a_binding_rank_is_said(evaluation):
    for name in ("federated", "local", "centralized"):
        report = evaluation.report["models"][name]
        assert report["rank_bound_devices"] == []
        for device in report["per_device"].values():
            assert 1 <= device["components"] < 16 and 0.9 <= device["explained_variance"] <= 1.0
    train, test = synthetic_fleet()
    said = []
    bound = evaluate_fleet(train, test, lambda: DeviceDetector.create(NAMES, load_config(env={}), warmup=50, seed=0,
                                                                      subspace_rank=1),
                           micro_batch=16, models=("local",), progress=said.append,
                           times=times(train, test)).report["models"]["local"]
    assert bound["rank_bound_devices"] == ["dev-0", "dev-1", "dev-2"]
    assert all(d["components"] == 1 and d["explained_variance"] < 0.9 for d in bound["per_device"].values())
    assert any(line.startswith("local: model.subspace.rank 1 caps k on 3 of 3 devices") for line in said), said


def test_the_rolling_robust_z_is_causal_and_follows_a_device_whose_scores_drift():
    rng = np.random.default_rng(0)
    calibration, scores = rng.gamma(2.0, size=500), rng.gamma(2.0, size=300)
    everything = rolling_robust_z(calibration, scores, window=10_000, step=10_000)  # one block: the calibration's z
    np.testing.assert_allclose(everything, robust_normaliser(calibration)(scores))
    z = rolling_robust_z(calibration, scores, window=200, step=16)
    later = scores.copy()
    later[100:] = 1e9                       # what comes later does not change what came before
    np.testing.assert_array_equal(rolling_robust_z(calibration, later, 200, 16)[:96], z[:96])
    drifted = np.r_[scores, 3.0 * rng.gamma(2.0, size=600)]   # the device's scores triple for good
    fixed, rolling = robust_normaliser(calibration)(drifted), rolling_robust_z(calibration, drifted, 200, 16)
    assert np.median(fixed[-200:]) > 2.0 and abs(np.median(rolling[-200:])) < 0.5
    with pytest.raises(ValueError, match="window and step"):
        rolling_robust_z(calibration, scores, 0, 16)


def test_pooling_on_recent_scores_reports_the_fixed_calibrations_figures_beside_it():
    train, test = synthetic_fleet()
    factory = lambda: DeviceDetector.create(NAMES, load_config(env={}), warmup=50, seed=0)  # noqa: E731
    fixed = evaluate_fleet(train, test, factory, micro_batch=16, models=("local",), times=times(train, test)).report
    rolling = evaluate_fleet(train, test, factory, micro_batch=16, models=("local",), pooling_window=200,
                             times=times(train, test)).report
    assert "fixed_calibration" not in fixed["models"]["local"]
    assert {k: rolling["models"]["local"]["fixed_calibration"][k] for k in ("roc_auc", "pr_auc", "best_f1")} == \
        {k: fixed["models"]["local"][k] for k in ("roc_auc", "pr_auc", "best_f1")}
    assert rolling["models"]["local"]["f1"] == fixed["models"]["local"]["f1"]  # the flags are the detector's own
    assert rolling["normalisation"].startswith("rolling robust z") and fixed["normalisation"].endswith("scores")


def test_pooling_on_the_detectors_own_z_uses_what_they_emit_and_reports_all_recent_beside_it():
    from orchestration.evaluate_cli import pooling_options
    train, test = synthetic_fleet()
    cfg = load_config(env={})
    factory = lambda: DeviceDetector.create(NAMES, cfg, warmup=50, seed=0)  # noqa: E731
    rolling = evaluate_fleet(train, test, factory, micro_batch=16, models=("local", "random"),
                             times=times(train, test), **pooling_options("rolling", 200))
    own = evaluate_fleet(train, test, factory, micro_batch=16, models=("local", "random"), times=times(train, test),
                         **pooling_options("own", 200))
    local = own.report["models"]["local"]
    assert local["all_recent"] == {k: rolling.report["models"]["local"][k] for k in ("roc_auc", "pr_auc", "best_f1")}
    assert local["own_z_missing"] == 0 and local["f1"] == rolling.report["models"]["local"]["f1"]
    # the pooled scores are the z the detector emitted (against its threshold history), not the rolling ones
    detector = factory()
    series = np.vstack([train["dev-0"], test["dev-0"][0]])
    stamps = np.concatenate(times(train, test)["dev-0"])
    z = np.concatenate([detector.process_many(series[start:start + 16], ts=stamps[start:start + 16]).z_scores
                        for start in range(0, len(series), 16)])
    np.testing.assert_allclose(own.scores["local"]["dev-0"], z[-len(test["dev-0"][0]):])
    assert not np.allclose(own.scores["local"]["dev-0"], rolling.scores["local"]["dev-0"])
    # models that emit no z (the baselines) are pooled as before
    assert "all_recent" not in own.report["models"]["random"]
    np.testing.assert_array_equal(own.scores["random"]["dev-1"], rolling.scores["random"]["dev-1"])
    assert own.report["normalisation"].startswith("detectors: the robust z they emit")
    with pytest.raises(ValueError, match="pooling: unknown"):
        pooling_options("median", 200)


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
                 "--models", "federated,isolation_forest,pca,random", "--json", str(out),
                 "--plot", str(tmp_path / "plot.png")])
    assert code == 0
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"federated", "isolation_forest", "pca", "random"}
    assert report["protocol"] == "stream" and report["bytes_per_round"] > 0 and report["model"] == "subspace"
    assert report["normalisation"].startswith("rolling robust z")  # a stream pools on recent scores by default
    printed = capsys.readouterr().out
    assert "| federated |" in printed and "pooled on the calibration scores alone" in printed
    code = main(["evaluate", "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
                 "--protocol", "batch", "--model", "ae", "--rounds", "2", "--models", "federated,random",
                 "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["rounds"] == 2 and report["protocol"] == "batch"
    assert report["normalisation"] == "robust z per device from calibration scores"  # a set, not a stream


def test_adoption_shares_are_reported_per_policy():
    """The federated row says how much of the global models the devices took: a fixed blend always some, the
    validated policy (each device on its own recent readings) between none and all, and it is deterministic."""
    train, test = synthetic_fleet(seed=1)

    def federated(policy):
        factory = lambda: DeviceDetector.create(NAMES, load_config(env={}), warmup=50, seed=0,  # noqa: E731
                                                adoption_policy=policy)
        return evaluate_fleet(train, test, factory, micro_batch=16, round_every=100, models=("federated",),
                              times=times(train, test)).report["models"]["federated"]

    blend, validated = federated("blend"), federated("validated")
    assert blend["adoptions"] == validated["adoptions"] == 3 * 8
    assert blend["adoptions_kept_own"] == 0 and 0 < blend["mean_adopted_share"] <= 0.5
    assert 0 <= validated["mean_adopted_share"] <= 1 and 0 <= validated["adoptions_kept_own"] <= 24
    assert validated["global_policy"] == "validated"
    again = federated("validated")
    assert (again["mean_adopted_share"], again["roc_auc"]) == (validated["mean_adopted_share"], validated["roc_auc"])


def test_unreadable_input_files_are_one_clear_line_not_a_traceback(tmp_path, capsys):
    from orchestration.cli import main
    test_file = tmp_path / "test.csv"
    test_file.write_text("device_id,timestamp,cpu,mem,label\nd1,1704067200000,0.1,0.2,0\n")
    train_file = tmp_path / "train.csv"
    train_file.write_text("device_id,timestamp,cpu,disk,label\nd1,1704067200000,0.1,0.2,0\n")
    assert main(["evaluate", "--train", str(tmp_path / "missing.csv"), "--test", str(test_file)]) == 2
    assert "flead evaluate:" in capsys.readouterr().err
    assert main(["evaluate", "--train", str(train_file), "--test", str(test_file)]) == 2
    err = capsys.readouterr().err
    assert "only in the training file: ['disk'], only here: ['mem']" in err and "Traceback" not in err


def test_a_database_that_does_not_answer_is_one_clear_line_not_a_traceback(monkeypatch, tmp_path, capsys):
    """Any command that reads MongoDB (here `flead report`) ends with the storage layer's reason and exit code 2."""
    from orchestration.cli import main
    from storage.mongo import Store, StorageUnavailable

    def unreachable(self, cfg, *args, **kwargs):
        raise StorageUnavailable("FLEAD_MONGO_URI: cannot connect to mongodb://127.0.0.1:1/")

    monkeypatch.setenv("FLEAD_STATE_DIR", str(tmp_path))
    monkeypatch.setattr(Store, "__init__", unreachable)
    assert main(["report", "--out", str(tmp_path / "report.md"), "--format", "md"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flead report: FLEAD_MONGO_URI: cannot connect") and "Traceback" not in err
