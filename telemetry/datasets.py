"""Per-device arrays for offline evaluation, built on `telemetry.readers` (one parser per format).

Every loader returns ``(train, test, metric_names)``:

- ``train``: ``{device_id: X}`` with ``X`` float64 of shape (n, d), columns in ``metric_names`` order;
- ``test``: ``{device_id: (X, y)}`` with ``y`` int8 of shape (n,), 1 = anomalous;
- devices in order of first appearance in the file; missing values are nan (the detector's nan policy decides).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from telemetry.readers import MultiEntityCsvReader, NabReader, NslKddReader, Reader, ReaderError

# NAB's "probationary period": the first 15% of each series, which detectors may learn from unscored.
NAB_PROBATIONARY_FRACTION = 0.15

Train = dict[str, np.ndarray]
Test = dict[str, tuple[np.ndarray, np.ndarray]]


def device_arrays(reader: Reader, metric_names: list[str] | None = None, times: dict | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """``{device_id: (X, y)}`` of everything ``reader`` yields; ``y`` is None for a device without labels. A dict
    given as `times` is filled with ``{device_id: event times}`` (epoch ms, int64), row for row."""
    names = metric_names or reader.metric_names
    rows: dict[str, list[list[float]]] = {}
    labels: dict[str, list[int | None]] = {}
    stamps: dict[str, list[int]] = {}
    for r in reader:
        rows.setdefault(r.device_id, []).append([r.metrics.get(name, np.nan) for name in names])
        labels.setdefault(r.device_id, []).append(r.label)
        stamps.setdefault(r.device_id, []).append(r.ts)
    out = {}
    for device, X in rows.items():
        y = labels[device]
        out[device] = (np.asarray(X, dtype=np.float64).reshape(len(X), len(names)),
                       None if None in y else np.asarray(y, dtype=np.int8))
        if times is not None:
            times[device] = np.asarray(stamps[device], dtype=np.int64)
    return out


def _labelled(arrays: dict, source: Path | str) -> Test:
    unlabelled = [device for device, (_, y) in arrays.items() if y is None]
    if unlabelled:
        raise ValueError(f"{source}: no labels for {', '.join(unlabelled[:5])}; test data needs ground truth")
    return arrays


def load_multi_entity(train_path: Path | str, test_path: Path | str, skip_bad: bool = False,
                      times: dict | None = None) -> tuple[Train, Test, list[str]]:
    """A multi-entity CSV pair (e.g. ASD ``train.csv.gz`` / ``test.csv.gz``); the test file needs a label column.
    A dict given as `times` is filled with ``{device_id: (training event times, test event times)}`` (epoch ms).

    On ASD: ``train["omi-1"].shape == (8640, 19)``, ``test["omi-1"][0].shape == (4320, 19)``, 19 metric names.
    """
    train_reader = MultiEntityCsvReader(train_path, skip_bad=skip_bad)
    test_reader = MultiEntityCsvReader(test_path, skip_bad=skip_bad)
    names = train_reader.metric_names
    if test_reader.metric_names != names:
        test_names = test_reader.metric_names
        only_train, only_test = [n for n in names if n not in test_names], [n for n in test_names if n not in names]
        detail = (f"only in the training file: {only_train[:10]}, only here: {only_test[:10]}"
                  if only_train or only_test else "the same columns in another order")
        raise ReaderError(test_path, 1, f"metric columns differ from {train_path}: {detail}")
    train_times, test_times = {}, {}
    train = {device: X for device, (X, _) in device_arrays(train_reader, times=train_times).items()}
    test = _labelled(device_arrays(test_reader, times=test_times), test_path)
    if times is not None:
        times.update({device: (train_times[device], test_times[device]) for device in train if device in test})
    return train, test, names


def load_nab(folder: Path | str, train_fraction: float = NAB_PROBATIONARY_FRACTION,
             windows_file: Path | str | None = None, times: dict | None = None) -> tuple[Train, Test, list[str]]:
    """Each NAB series split in time: the first ``train_fraction`` is train, the rest (with labels) is test. A dict
    given as `times` is filled with ``{device_id: (training event times, test event times)}`` (epoch ms)."""
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")
    reader = NabReader(folder, windows_file=windows_file)
    if reader.windows_file is None:
        raise ValueError(f"{folder}: no labels/combined_windows.json in or above it; pass windows_file")
    train, test, stamps = {}, {}, {}
    for device, (X, y) in _labelled(device_arrays(reader, times=stamps), folder).items():
        k = int(len(X) * train_fraction)
        train[device], test[device] = X[:k], (X[k:], y[k:])
        if times is not None:
            times[device] = (stamps[device][:k], stamps[device][k:])
    return train, test, reader.metric_names


def load_nsl_kdd(train_file: Path | str, test_file: Path | str, clients: int = 10, non_iid: bool = False,
                 seed: int = 0, features: str = "numeric",
                 train_normal_only: bool = False) -> tuple[Train, Test, list[str]]:
    """NSL-KDD train/test files split into ``clients`` devices the same way (see `NslKddReader`).

    ``train_normal_only=True`` keeps only normal training rows (the semi-supervised setting; it uses the
    labels to filter, so say so when reporting). Clients with no test rows are absent from ``test``.
    """
    options = dict(clients=clients, non_iid=non_iid, seed=seed, features=features)
    train_reader, test_reader = NslKddReader(train_file, **options), NslKddReader(test_file, **options)
    train = {}
    for device, (X, y) in device_arrays(train_reader).items():
        train[device] = X[y == 0] if train_normal_only else X
    return train, device_arrays(test_reader), train_reader.metric_names
