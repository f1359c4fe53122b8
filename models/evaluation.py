"""Offline comparison of local, federated and centralized detectors and two baselines on the same split.

Protocol (no test label is used for anything but the final metrics):

1. Each device's training series is split in time: the first ``1 − validation_fraction`` trains, the last
   ``validation_fraction`` calibrates (it is never learned from, so its scores are out-of-sample like test's).
2. Models: ``local`` (one network per device), ``federated`` (every device starts from the same seeded network,
   trains ``local_epochs`` per round, a strategy, FedAvg by default, aggregates, for ``rounds`` rounds; with
   ``finetune_epochs`` also ``federated_finetuned``: local epochs on top of the final global model),
   ``centralized`` (one network on the pooled training data of all devices, devices interleaved in chunks),
   ``isolation_forest`` and ``dbscan`` (one per device), ``random``, plus any ``extra_models``. Networks get the same number
   of epochs over their data: ``rounds × local_epochs``. In ``local`` and ``federated`` the input scaler stays
   on the device, as in the stream job.
3. Fleet pooling: a device's test scores are normalised by its own calibration scores (robust z-score:
   ``(s − median) / (1.4826 · MAD)``), so devices with larger errors do not dominate, then pooled.
4. Operating threshold: per device, as in the stream job, the configured threshold rule (POT by default) fit
   on that device's calibration scores, at ``target_false_alarm_rate``.
5. Metrics (`models.metrics.detection_metrics`) on the pooled scores and flags, and their mean over devices.
   The pooled ``best_f1`` is the best single fleet-wide threshold on the pooled normalised scores: per-device
   thresholds can beat it, so on the pooled data it bounds fleet-wide thresholds only; per device it is an
   upper bound as usual.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from models.aggregation import FedAvg, Update
from models.baselines import DBSCANScores, IsolationForestScores, RandomScores
from models.metrics import detection_metrics
from models.thresholds import make_threshold

MAD_TO_STD = 1.4826          # MAD × this estimates the standard deviation of a normal distribution
MIN_SPREAD = 1e-12           # a constant calibration score gives spread 0: divide by this instead
ALL_MODELS = ("federated", "local", "centralized", "isolation_forest", "dbscan", "random")
CENTRALIZED_CHUNK = 256      # rows per device in turn when training on pooled data (keeps short-term order)

Train = Mapping[str, np.ndarray]
Test = Mapping[str, tuple[np.ndarray, np.ndarray]]
Progress = Callable[[str], None]


@dataclass
class FleetEvaluation:
    """``report``: JSON-ready results; ``scores[model][device]``: normalised test scores;
    ``thresholds[model][device]``: the operating threshold on that scale."""

    report: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)


def split_for_calibration(X: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit part, calibration part) of one device's training series, split in time."""
    n_val = int(round(len(X) * validation_fraction))
    if n_val < 1 or n_val >= len(X):
        raise ValueError(f"{len(X)} training rows cannot be split with validation_fraction={validation_fraction}")
    return X[:-n_val], X[-n_val:]


def robust_normaliser(calibration_scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``s ↦ (s − median) / (1.4826 · MAD)`` of the calibration scores (no labels)."""
    finite = calibration_scores[np.isfinite(calibration_scores)]
    centre = float(np.median(finite))
    spread = MAD_TO_STD * float(np.median(np.abs(finite - centre)))
    if spread <= MIN_SPREAD:   # more than half the scores equal: fall back to the standard deviation
        spread = max(float(np.std(finite)), MIN_SPREAD)
    return lambda s: (np.asarray(s, dtype=np.float64) - centre) / spread


def operating_threshold(calibration_scores: np.ndarray, threshold_cfg: Mapping[str, Any]) -> float:
    """The configured threshold rule (``kind``, ``target_false_alarm_rate``...) fit once on calibration scores."""
    rule = make_threshold({**threshold_cfg, "history": max(len(calibration_scores), 1)})
    rule.update_many(calibration_scores)
    rule.refit()
    return rule.threshold


def _model_bytes(weights: list[np.ndarray]) -> int:
    return int(sum(np.asarray(w).nbytes for w in weights))


class FleetEvaluator:
    """Runs the protocol of the module docstring; `evaluate_fleet` is its one-call form."""

    def __init__(self, train: Train, test: Test, model_factory: Callable[[], Any], rounds: int, local_epochs: int,
                 strategy: Any = None, finetune_epochs: int = 0, validation_fraction: float = 0.2,
                 threshold_cfg: Mapping[str, Any] | None = None, extra_models: Mapping[str, Callable[[], Any]] | None = None,
                 seed: int = 0, progress: Progress | None = None):
        missing = sorted(set(test) - set(train))
        if missing:
            raise ValueError(f"devices in test without training data: {missing[:5]}")
        self.devices = [d for d in train if d in test]
        self.fit = {}
        self.calibration = {}
        for d in self.devices:
            self.fit[d], self.calibration[d] = split_for_calibration(np.asarray(train[d], dtype=np.float64),
                                                                     validation_fraction)
        self.test = {d: (np.asarray(test[d][0], dtype=np.float64), np.asarray(test[d][1]).astype(int))
                     for d in self.devices}
        self.model_factory = model_factory
        self.rounds, self.local_epochs, self.finetune_epochs = rounds, local_epochs, finetune_epochs
        self.strategy = strategy or FedAvg()
        self.threshold_cfg = dict(threshold_cfg or {"kind": "pot", "target_false_alarm_rate": 0.01})
        self.extra_models = dict(extra_models or {})
        self.seed = seed
        self.say = progress or (lambda line: None)
        self.result = FleetEvaluation(report={})

    # -- scoring and metrics -------------------------------------------------------------------------------------

    def _record(self, name: str, calibration: dict[str, np.ndarray], test_scores: dict[str, np.ndarray],
                **facts: Any) -> None:
        """Normalise and threshold per device, pool, and store the metrics of one model."""
        normalised_test, thresholds = {}, {}
        for d in self.devices:
            normalise = robust_normaliser(calibration[d])
            normalised_test[d] = normalise(test_scores[d])
            thresholds[d] = operating_threshold(normalise(calibration[d]), self.threshold_cfg)
        y = np.concatenate([self.test[d][1] for d in self.devices])
        point_thresholds = np.concatenate([np.full(len(normalised_test[d]), thresholds[d]) for d in self.devices])
        pooled = detection_metrics(y, np.concatenate([normalised_test[d] for d in self.devices]), point_thresholds)
        per_device = {d: detection_metrics(self.test[d][1], normalised_test[d], thresholds[d]) for d in self.devices}
        device_mean = {k: float(np.nanmean([m[k] for m in per_device.values()]))
                       if not all(math.isnan(m[k]) for m in per_device.values()) else math.nan
                       for k in pooled}
        for d in self.devices:
            per_device[d]["threshold"] = thresholds[d]
        self.result.report.setdefault("models", {})[name] = {
            **pooled, "per_device_mean": device_mean, "per_device": per_device, **facts}
        self.result.scores[name] = normalised_test
        self.result.thresholds[name] = thresholds
        self.say(f"{name:<22} roc_auc={pooled['roc_auc']:.3f} pr_auc={pooled['pr_auc']:.3f} "
                 f"f1={pooled['f1']:.3f} best_f1={pooled['best_f1']:.3f}")

    def _score_all(self, model_of: Callable[[str], Any], method: str = "score_many"
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        calibration, test = {}, {}
        for d in self.devices:
            score = getattr(model_of(d), method)
            calibration[d], test[d] = score(self.calibration[d]), score(self.test[d][0])
        return calibration, test

    # -- the models --------------------------------------------------------------------------------------------

    def run_local(self) -> None:
        models = {}
        for i, d in enumerate(self.devices):
            models[d] = self.model_factory()
            for _ in range(self.rounds * self.local_epochs):
                models[d].learn_many(self.fit[d])
            if (i + 1) % max(1, len(self.devices) // 4) == 0:
                self.say(f"local: {i + 1}/{len(self.devices)} devices trained")
        self._record("local", *self._score_all(models.__getitem__), bytes_per_round=0)

    def run_federated(self) -> None:
        models = {d: self.model_factory() for d in self.devices}
        global_weights = None
        round_bytes = 0
        for r in range(1, self.rounds + 1):
            updates = []
            for d, model in models.items():
                if global_weights is not None:
                    model.set_weights(global_weights)
                for _ in range(self.local_epochs):
                    model.learn_many(self.fit[d])
                updates.append(Update(d, model.get_weights(), n_samples=len(self.fit[d]), version=r))
            current = global_weights or updates[0].weights
            aggregated = (self.strategy.aggregate(updates, current=current) if isinstance(self.strategy, FedAvg)
                          else self.strategy.aggregate(updates))
            global_weights = aggregated.weights
            # Every participant uploads its model and downloads the new global one.
            round_bytes = 2 * len(updates) * _model_bytes(global_weights)
            losses = [m.loss for m in models.values() if getattr(m, "loss", None) is not None]
            self.say(f"federated round {r}/{self.rounds}: {len(aggregated.participants)} participants, "
                     f"{len(aggregated.rejected)} rejected, mean local loss {np.mean(losses) if losses else math.nan:.4f}")
        for model in models.values():
            model.set_weights(global_weights)
        facts = {"bytes_per_round": round_bytes, "rounds": self.rounds, "strategy": aggregated.strategy}
        self._record("federated", *self._score_all(models.__getitem__), **facts)
        if self.finetune_epochs:
            for d, model in models.items():
                for _ in range(self.finetune_epochs):
                    model.learn_many(self.fit[d])
            self._record("federated_finetuned", *self._score_all(models.__getitem__),
                         finetune_epochs=self.finetune_epochs, **facts)
        self.result.report["bytes_per_round"] = round_bytes
        self.result.report["model_bytes"] = _model_bytes(global_weights)

    def run_centralized(self) -> None:
        model = self.model_factory()
        chunks = {d: [X[i:i + CENTRALIZED_CHUNK] for i in range(0, len(X), CENTRALIZED_CHUNK)]
                  for d, X in self.fit.items()}
        longest = max(len(c) for c in chunks.values())
        interleaved = [chunks[d][k] for k in range(longest) for d in self.devices if k < len(chunks[d])]
        for epoch in range(self.rounds * self.local_epochs):
            for chunk in interleaved:
                model.learn_many(chunk)
        raw_bytes = int(sum(X.nbytes for X in self.fit.values()))
        self._record("centralized", *self._score_all(lambda d: model), bytes_total=raw_bytes)

    def run_per_device_baseline(self, name: str, make: Callable[[int], Any]) -> None:
        fitted = {d: make(self.seed + i).fit(self.fit[d]) for i, d in enumerate(self.devices)}
        self._record(name, *self._score_all(fitted.__getitem__, method="score"))

    def run(self, models: tuple[str, ...] = ALL_MODELS) -> FleetEvaluation:
        runners = {"federated": self.run_federated, "local": self.run_local, "centralized": self.run_centralized,
                   "isolation_forest": lambda: self.run_per_device_baseline(
                       "isolation_forest", lambda seed: IsolationForestScores(seed=seed)),
                   "dbscan": lambda: self.run_per_device_baseline("dbscan", lambda seed: DBSCANScores(seed=seed)),
                   "random": lambda: self.run_per_device_baseline("random", lambda seed: RandomScores(seed=seed))}
        unknown = sorted(set(models) - set(runners))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(runners)}")
        for name in models:
            runners[name]()
        for name, make in self.extra_models.items():
            self.run_per_device_baseline(name, lambda seed, make=make: make())
        y = np.concatenate([self.test[d][1] for d in self.devices])
        self.result.report.update({"devices": len(self.devices), "rounds": self.rounds,
                                   "local_epochs": self.local_epochs, "test_rows": int(len(y)),
                                   "anomaly_rate": float(y.mean()) if len(y) else math.nan,
                                   "protocol": "robust z per device from calibration scores; threshold "
                                               f"{self.threshold_cfg.get('kind')} on calibration scores"})
        return self.result


def evaluate_fleet(train: Train, test: Test, model_factory: Callable[[], Any], rounds: int = 10,
                   local_epochs: int = 1, **options: Any) -> FleetEvaluation:
    """Compare local, federated, centralized, Isolation Forest, DBSCAN and random on one split (module docstring).

    ``train``: device → X (n, d); ``test``: device → (X, y). ``model_factory()`` returns a fresh, identically
    seeded model with ``learn_many``, ``score_many``, ``get_weights``, ``set_weights`` (e.g. a `DeviceDetector`).
    ``options``: ``strategy`` (default `FedAvg()`), ``finetune_epochs``, ``validation_fraction``, ``threshold_cfg``,
    ``extra_models`` (name → factory of a ``fit``/``score`` detector, run per device), ``seed``, ``progress``,
    ``models`` (which of `ALL_MODELS` to run).
    """
    models = options.pop("models", ALL_MODELS)
    return FleetEvaluator(train, test, model_factory, rounds, local_epochs, **options).run(tuple(models))
