"""One device's anomaly detector: features → running scaler → autoencoder → online threshold.

This is the keyed state of the stream job and the unit of evaluation. Only the network weights are federated
(`get_weights`, `set_weights`, `adopt_global`); the scaler, the feature buffer and the threshold stay local.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from models.autoencoder import DenseAutoencoder, check_weight_shapes
from models.features import FeatureBuilder
from models.lstm_autoencoder import LSTMAutoencoder
from models.scaler import RunningScaler
from models.serialization import SerializationError, dumps, loads
from models.thresholds import make_threshold, threshold_from_array

ARCHITECTURE = "flead.device-detector/1"  # format of `to_bytes`
THRESHOLD_START_FRACTION = 0.5  # scores of the first half of warm-up come from a barely trained network and
#                                 would inflate the threshold: it learns only from scores after this share


@dataclass(frozen=True)
class DetectorSettings:
    """Every setting the detector uses: `model.*` (features flattened) and `threshold.*` (`kind` as
    `threshold_kind`) of the configuration."""

    kind: str
    hidden: tuple[int, ...]
    activation: str
    optimizer: str
    learning_rate: float
    batch_size: int
    grad_clip: float
    window: int
    lstm_hidden: int
    seed: int
    top_k_metrics: int
    rolling_windows: tuple[int, ...]
    lags: tuple[int, ...]
    rate_of_change: bool
    nan_policy: str
    threshold_kind: str
    target_false_alarm_rate: float
    sigma_k: float
    warmup: int
    history: int

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "DetectorSettings":
        """Read `cfg.model` and `cfg.threshold`, then apply keyword `overrides` (field names of this class)."""
        model, threshold = cfg.model, cfg.threshold
        features = model.features
        values = {f.name: getattr(model, f.name) for f in dataclasses.fields(cls)
                  if f.name in model and f.name != "features"}
        values.update({name: features[name] for name in ("rolling_windows", "lags", "rate_of_change")})
        values.update({name: threshold[name] for name in ("target_false_alarm_rate", "sigma_k", "warmup", "history")})
        values["threshold_kind"] = threshold.kind
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown detector setting(s) {unknown}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "DetectorSettings":
        tuples = ("hidden", "rolling_windows", "lags")
        return cls(**{k: tuple(int(x) for x in v) if k in tuples else v for k, v in values.items()})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DetectionResult:
    """What `process_many` returns for a batch of n readings."""

    scores: np.ndarray           # (n,) anomaly score (reconstruction error of the scaled features)
    thresholds: np.ndarray       # (n,) the cut each score was compared with
    is_anomaly: np.ndarray       # (n,) bool; all False while the device is warming up
    top_metrics: list            # n lists of (metric, share of the reading's error), largest first
    n_imputed: int               # non-finite values imputed in this batch


class DeviceDetector:
    """Score, then learn, a device's readings; flag scores above an online threshold after a warm-up.

    Create with `create`; see docs/contracts.md for the contract. Scores are honest out-of-sample errors: a
    batch is scored before anything (scaler, network, threshold) learns from it.

    >>> import numpy as np
    >>> det = DeviceDetector.create(["cpu", "mem", "disk"], hidden=[4, 2, 4], warmup=100, seed=0)
    >>> rng = np.random.default_rng(0)
    >>> normal = rng.normal(0.5, 0.05, size=(400, 3))
    >>> flagged = sum(det.process_many(normal[i:i + 16]).is_anomaly.sum() for i in range(0, 400, 16))
    >>> res = det.process_many(np.array([[0.5, 0.5, 3.0]]))
    >>> bool(res.is_anomaly[0]), res.top_metrics[0][0][0]
    (True, 'disk')
    >>> DeviceDetector.from_bytes(det.to_bytes()).n_seen
    401
    """

    def __init__(self, metric_names: Sequence[str], settings: DetectorSettings):
        self.metric_names = list(metric_names)
        self._metric_name_array = np.array(self.metric_names, dtype=object)  # for indexing by top-k positions
        self.settings = s = settings
        self.features = FeatureBuilder(self.metric_names, s.rolling_windows, s.lags, s.rate_of_change, s.nan_policy)
        self.scaler = RunningScaler()
        self.network = _make_network(s)
        self.network.initialize(self.features.n_features)
        self.threshold = make_threshold({"kind": s.threshold_kind, "target_false_alarm_rate":
                                         s.target_false_alarm_rate, "sigma_k": s.sigma_k, "history": s.history})
        self.n_seen = 0
        self.model_version = 0
        self.global_version = 0
        self._n_since_snapshot = 0

    @classmethod
    def create(cls, metric_names: Sequence[str], cfg: Any = None, **overrides: Any) -> "DeviceDetector":
        """A fresh detector for readings with `metric_names`, set up from `cfg` (default: `load_config()`) and
        keyword `overrides` of `DetectorSettings` fields (``hidden=[8]``, ``warmup=50``, ``threshold_kind=...``)."""
        if cfg is None:
            from config import load_config  # only here: models does not depend on config otherwise
            cfg = load_config()
        return cls(metric_names, DetectorSettings.from_config(cfg, **overrides))

    # -- scoring and learning ---------------------------------------------------------------------------------

    @property
    def loss(self) -> float | None:
        """Training loss of the network's last optimiser step."""
        return self.network.loss

    def _readings(self, X: np.ndarray) -> np.ndarray:
        X = np.array(X, dtype=np.float64, ndmin=2)
        if X.shape[1] != len(self.metric_names):
            raise ValueError(f"expected {len(self.metric_names)} metrics ({', '.join(self.metric_names)}), "
                             f"got {X.shape[1]} columns")
        if X.shape[0] == 0:
            raise ValueError("empty batch: give at least one reading")
        return X

    def _feature_errors(self, F: np.ndarray) -> np.ndarray:
        """Squared reconstruction error of each feature of the feature rows `F` (current scaler and network)."""
        return self.network.feature_errors(self.scaler.transform_many(F))

    def score_many(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score of each reading; changes no state (apart from the network's lazy set-up)."""
        return self._feature_errors(self.features.transform_many(self._readings(X))).mean(axis=1)

    def learn_many(self, X: np.ndarray) -> None:
        """Learn from the readings: features, scaler, network, and the threshold from their scores."""
        F = self.features.transform_and_learn_many(self._readings(X))
        self._learn(F, self._feature_errors(F).mean(axis=1))

    def _learn(self, F: np.ndarray, scores: np.ndarray) -> None:
        """Learn from the features `F` of readings the feature buffer has already taken, and from their `scores`:
        scaler, then network (on the updated scaling), then threshold."""
        self.scaler.learn_many(F)
        self.network.learn_many(self.scaler.transform_many(F))
        first_for_threshold = max(0, int(self.settings.warmup * THRESHOLD_START_FRACTION) - self.n_seen)
        self.threshold.update_many(scores[first_for_threshold:])
        self.n_seen += F.shape[0]
        self._n_since_snapshot += F.shape[0]

    def process_many(self, X: np.ndarray) -> DetectionResult:
        """Score the batch against the current threshold, then learn from it."""
        X = self._readings(X)
        n = X.shape[0]
        imputed_before = self.features.n_imputed
        F = self.features.transform_and_learn_many(X)  # features as before the batch: scoring sees no learning
        errors = self._feature_errors(F)
        scores = np.add.reduce(errors, axis=1) / errors.shape[1]  # = errors.mean(axis=1), without its overhead
        cut = self.threshold.threshold
        is_anomaly = scores > cut
        if self.n_seen < self.settings.warmup:
            is_anomaly &= self.n_seen + np.arange(n) >= self.settings.warmup
        top_metrics = self.top_metrics(errors)
        self._learn(F, scores)
        return DetectionResult(scores=scores, thresholds=np.full(n, cut), is_anomaly=is_anomaly,
                               top_metrics=top_metrics, n_imputed=self.features.n_imputed - imputed_before)

    def process_one(self, x: np.ndarray) -> DetectionResult:
        return self.process_many(np.asarray(x, dtype=np.float64)[None, :])

    def top_metrics(self, feature_errors: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per reading, the `top_k_metrics` metrics with the largest share of its error (derived features count
        for their metric); ties go to the metric listed first."""
        n, d = feature_errors.shape[0], len(self.metric_names)
        per_metric = np.add.reduce(feature_errors.reshape(n, self.features.blocks, d), axis=1)
        total = np.add.reduce(per_metric, axis=1, keepdims=True)
        positive = total > 0
        if positive.all():
            shares = per_metric / total
        else:
            shares = np.divide(per_metric, total, out=np.zeros_like(per_metric), where=positive)
        top = np.argsort(-shares, axis=1, kind="stable")[:, :self.settings.top_k_metrics]
        pairs = list(zip(self._metric_name_array[top].ravel().tolist(),
                         shares[np.arange(n)[:, None], top].ravel().tolist()))
        k = top.shape[1]
        return [pairs[i:i + k] for i in range(0, n * k, k)]

    # -- federation ---------------------------------------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        return self.network.get_weights()

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.network.set_weights(weights)

    def adopt_global(self, weights: list[np.ndarray], version: int, policy: str = "replace",
                     blend_weight: float = 0.5) -> None:
        """Take a global model: ``replace`` the weights, or ``blend`` them (``(1 − b)·local + b·global``).

        The optimiser's moments are kept: they describe the loss surface locally and re-adapt within a few
        hundred steps.
        """
        local = self.get_weights()
        check_weight_shapes(local, weights)
        if policy == "replace":
            self.set_weights(weights)
        elif policy == "blend":
            if not 0.0 <= blend_weight <= 1.0:
                raise ValueError(f"stream.blend_weight must be in [0, 1], got {blend_weight}")
            self.set_weights([(1.0 - blend_weight) * w + blend_weight * np.asarray(g, dtype=np.float64)
                              for w, g in zip(local, weights)])
        else:
            raise ValueError(f"stream.global_policy: unknown policy {policy!r} (known: replace, blend)")
        self.global_version = int(version)

    def snapshot(self) -> dict:
        """A new local model version for the aggregator: weights (serialised) and the readings learned since the
        previous snapshot (the FedAvg weight)."""
        self.model_version += 1
        snap = {"n_samples": self._n_since_snapshot, "loss": self.loss, "version": self.model_version,
                "global_version": self.global_version,
                "weights": dumps(self.get_weights(), {"architecture": self.network.architecture,
                                                      "model_version": self.model_version,
                                                      "global_version": self.global_version})}
        self._n_since_snapshot = 0
        return snap

    # -- persistence --------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state (settings, features buffer, scaler, network and optimiser, threshold, counters)."""
        loss = math.nan if self.loss is None else self.loss
        counters = np.array([self.n_seen, self.model_version, self.global_version, self._n_since_snapshot, loss])
        arrays = [counters, self.features.to_array(), self.scaler.to_array(), self.threshold.to_array(),
                  *self.network.get_state()]
        return dumps(arrays, {"architecture": ARCHITECTURE, "model_version": self.model_version,
                              "network": self.network.architecture, "metric_names": self.metric_names,
                              "settings": self.settings.to_dict()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "DeviceDetector":
        arrays, meta = loads(blob)
        if meta.get("architecture") != ARCHITECTURE:
            raise SerializationError(f"not a device detector: architecture {meta.get('architecture')!r}, "
                                     f"expected {ARCHITECTURE!r}")
        det = cls(meta["metric_names"], DetectorSettings.from_dict(meta["settings"]))
        counters, features, scaler, threshold, *network = arrays
        det.n_seen, det.model_version, det.global_version, det._n_since_snapshot = (int(c) for c in counters[:4])
        det.features = FeatureBuilder.from_array(features, det.metric_names)
        det.scaler = RunningScaler.from_array(scaler)
        det.threshold = threshold_from_array(threshold)
        det.network.set_state(network)
        det.network.loss = None if math.isnan(counters[4]) else float(counters[4])
        return det


def _make_network(s: DetectorSettings) -> DenseAutoencoder | LSTMAutoencoder:
    if s.kind == "ae":
        return DenseAutoencoder(s.hidden, s.activation, s.optimizer, s.learning_rate, s.batch_size, s.grad_clip,
                                s.seed)
    if s.kind == "lstm_ae":
        return LSTMAutoencoder(s.window, s.lstm_hidden, s.optimizer, s.learning_rate, s.batch_size, s.grad_clip,
                               s.seed)
    raise ValueError(f"model.kind: unknown model {s.kind!r} (known: ae, lstm_ae)")
