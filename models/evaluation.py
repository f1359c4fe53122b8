"""Offline comparison of local, federated and centralized detectors and baselines on the same split.

Protocol (no test label is used for anything but the final metrics):

1. Each device's training series is split in time: the first ``1 − validation_fraction`` fits, the last
   ``validation_fraction`` calibrates.
2. Detectors (`DeviceDetector`s from ``model_factory``) run as in the stream job (``protocol="stream"``, the
   default): each device's detector scores, then learns, every reading of its fit, calibration and test parts
   in micro-batches of ``micro_batch`` readings, in time order; its scores are out-of-sample (a batch is scored
   before it is learned) and its flags come from its own online threshold, label-free.
   ``local``: every device alone. ``federated``: every ``round_every`` readings per device, each device
   snapshots, the strategy (FedAvg by default) aggregates the snapshots in the vector space of
   `models.updates.codec_for` (`models.federation` for the subspace kind), and every device adopts the result
   by the adoption policy of its own settings (``stream.global_policy``: ``prior``, ``blend`` a fixed share
   ``stream.blend_weight``, ``validated`` a share per device and round chosen on its own recent readings, or
   ``replace``; `DeviceDetector.adopt_global`), as the stream job does with the Spark aggregation job.
   ``centralized``: one model learns every device's readings (interleaved micro-batch by micro-batch); the
   per-device parts (feature buffer, scaler, residual scales, threshold) stay per device, so only how the model
   is shared differs from ``federated``.
   ``protocol="batch"`` is the earlier offline protocol: ``rounds × local_epochs`` epochs over the fit part, a
   frozen model scores calibration and test, and flags come from the configured threshold rule fit on the
   calibration scores (with ``finetune_epochs`` also ``federated_finetuned``).
3. Baselines, one per device, fit on the fit part: ``isolation_forest``, ``pca`` (classic PCA reconstruction
   error, k at 90 % variance), ``dbscan``, ``random``, plus any ``extra_models``; their operating flags come
   from the configured threshold rule (POT by default) fit on their calibration scores.
4. Fleet pooling: a device's test scores are normalised by its own scores (robust z-score:
   ``(s − median) / (1.4826 · MAD)``), so devices with larger errors do not dominate, then pooled. With
   ``pooling_window`` W > 0, causally, by its last W scores before each micro-batch (calibration scores first:
   `rolling_robust_z`, as a live system normalises); with 0, by its calibration scores alone. With ``own_z``
   (and W), detectors in the stream protocol are pooled on the robust z they emit themselves, whose recent scores
   leave an incident's episode out.
5. Metrics (`models.metrics`) on the pooled scores and flags, and their mean over devices: ROC-AUC, PR-AUC,
   F1 at the operating flags, best F1 (an upper bound: the best single fleet-wide threshold on the pooled
   normalised scores, picked with the labels), point-adjusted F1 (inflated, for comparison only), and the
   event-level incident precision / recall / F1 (flags grouped into incidents as the stream job groups them,
   gap ``incident_gap`` readings) and the composite F1 of Garg et al. (2021).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from models.aggregation import AggregationError, FedAvg, Update
from models.baselines import DBSCANScores, IsolationForestScores, PCAScores, RandomScores
from models.updates import codec_for
from models.metrics import detection_metrics_from_flags, event_counts, event_metrics
from models.serialization import loads
from models.thresholds import MAD_TO_STD, make_threshold

MIN_SPREAD = 1e-12           # a constant calibration score gives spread 0: divide by this instead
ALL_MODELS = ("federated", "local", "centralized", "isolation_forest", "pca", "dbscan", "random")
PROTOCOLS = ("stream", "batch")
CENTRALIZED_CHUNK = 256      # batch protocol: rows per device in turn when training on pooled data

Train = Mapping[str, np.ndarray]
Test = Mapping[str, tuple[np.ndarray, np.ndarray]]
Progress = Callable[[str], None]


@dataclass
class FleetEvaluation:
    """``report``: JSON-ready results; ``scores[model][device]``: normalised test scores; ``raw_scores``: the
    model's own test scores; ``flags[model][device]``: the operating flags on the test part;
    ``p_values[model][device]``: conformal p-values of the test scores (the detector's own online ones in the
    stream protocol, else against the device's calibration scores)."""

    report: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    raw_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    flags: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    p_values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class ModelOutput:
    """One model's raw output on one device: calibration scores, test scores, and (detectors in the stream
    protocol) the test flags, p-values and robust z the detector gave itself."""

    calibration: np.ndarray
    test: np.ndarray
    flags: np.ndarray | None = None
    p_values: np.ndarray | None = None
    z_scores: np.ndarray | None = None


def split_for_calibration(X: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit part, calibration part) of one device's training series, split in time."""
    n_val = int(round(len(X) * validation_fraction))
    if n_val < 1 or n_val >= len(X):
        raise ValueError(f"{len(X)} training rows cannot be split with validation_fraction={validation_fraction}")
    return X[:-n_val], X[-n_val:]


def _series_times(device: str, times: tuple[np.ndarray, np.ndarray], n_train: int, n_test: int) -> np.ndarray:
    """One device's training then test event times, checked against its rows."""
    train_ts, test_ts = (np.asarray(t, dtype=np.int64) for t in times)
    if len(train_ts) != n_train or len(test_ts) != n_test:
        raise ValueError(f"{device}: {len(train_ts)} + {len(test_ts)} event times for {n_train} + {n_test} rows")
    return np.concatenate([train_ts, test_ts])


def robust_normaliser(calibration_scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``s ↦ (s − median) / (1.4826 · MAD)`` of the calibration scores (no labels)."""
    finite = calibration_scores[np.isfinite(calibration_scores)]
    centre = float(np.median(finite))
    spread = MAD_TO_STD * float(np.median(np.abs(finite - centre)))
    if spread <= MIN_SPREAD:   # more than half the scores equal: fall back to the standard deviation
        spread = max(float(np.std(finite)), MIN_SPREAD)
    return lambda s: (np.asarray(s, dtype=np.float64) - centre) / spread


def rolling_robust_z(calibration_scores: np.ndarray, scores: np.ndarray, window: int, step: int) -> np.ndarray:
    """Causal robust z of `scores`: each block of `step` scores against the median and 1.4826 · MAD
    (`robust_normaliser`) of the `window` scores before it, the calibration scores first, then the scores already
    seen. What a live system computes from its recent scores (the detector's own ``z_scores``): a calibration fixed
    once goes stale when a device's scores drift, and misplaces that device in a fleet-wide ranking (no labels)."""
    if window < 1 or step < 1:
        raise ValueError(f"rolling robust z: window and step must be >= 1, got {window} and {step}")
    calibration_scores = np.asarray(calibration_scores, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    history = np.concatenate([calibration_scores, scores])
    first = calibration_scores.shape[0]
    out = np.empty(scores.shape[0])
    for start in range(0, scores.shape[0], step):
        recent = history[max(0, first + start - window):first + start]
        out[start:start + step] = robust_normaliser(recent)(scores[start:start + step])
    return out


def operating_threshold(calibration_scores: np.ndarray, threshold_cfg: Mapping[str, Any]) -> float:
    """The configured threshold rule (``kind``, ``target_false_alarm_rate``...) fit once on calibration scores."""
    rule = make_threshold({**threshold_cfg, "history": max(len(calibration_scores), 1)})
    rule.update_many(calibration_scores)
    rule.refit()
    return rule.threshold


def calibration_p_values(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values of `scores` against fixed calibration scores: ``(1 + #{cal ≥ s}) / (n + 1)``."""
    calibration = np.sort(calibration_scores[np.isfinite(calibration_scores)])
    n = calibration.shape[0]
    return (1.0 + n - np.searchsorted(calibration, scores, side="left")) / (n + 1.0)


def _model_bytes(weights: list[np.ndarray]) -> int:
    return int(sum(np.asarray(w).nbytes for w in weights))


class FleetEvaluator:
    """Runs the protocol of the module docstring; `evaluate_fleet` is its one-call form."""

    def __init__(self, train: Train, test: Test, model_factory: Callable[[], Any], rounds: int = 10,
                 local_epochs: int = 1, strategy: Any = None, finetune_epochs: int = 0,
                 validation_fraction: float = 0.2, threshold_cfg: Mapping[str, Any] | None = None,
                 extra_models: Mapping[str, Callable[[], Any]] | None = None, seed: int = 0,
                 progress: Progress | None = None, protocol: str = "stream", micro_batch: int = 16,
                 round_every: int = 500, incident_gap: int = 10, pooling_window: int = 0, own_z: bool = False,
                 times: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None):
        missing = sorted(set(test) - set(train))
        if missing:
            raise ValueError(f"devices in test without training data: {missing[:5]}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: unknown {protocol!r} (known: {', '.join(PROTOCOLS)})")
        self.devices = [d for d in train if d in test]
        self.fit = {}
        self.calibration = {}
        for d in self.devices:
            self.fit[d], self.calibration[d] = split_for_calibration(np.asarray(train[d], dtype=np.float64),
                                                                     validation_fraction)
        self.test = {d: (np.asarray(test[d][0], dtype=np.float64), np.asarray(test[d][1]).astype(int))
                     for d in self.devices}
        # Event times (epoch ms) of each device's fit, calibration and test rows, one series; None: not known.
        self.times = None if times is None else {d: _series_times(d, times[d], len(train[d]), len(self.test[d][0]))
                                                 for d in self.devices}
        self.model_factory = model_factory
        self.rounds, self.local_epochs, self.finetune_epochs = rounds, local_epochs, finetune_epochs
        self.strategy = strategy or FedAvg()
        self.threshold_cfg = dict(threshold_cfg or {"kind": "pot", "target_false_alarm_rate": 0.01})
        self.extra_models = dict(extra_models or {})
        self.seed = seed
        self.say = progress or (lambda line: None)
        self.protocol = protocol
        self.micro_batch, self.round_every = int(micro_batch), int(round_every)
        self.incident_gap = int(incident_gap)
        self.pooling_window = int(pooling_window)  # 0: the fixed calibration normalises (`rolling_robust_z`)
        self.own_z = bool(own_z)  # with a window: detectors that emit z_scores are pooled on them
        self.result = FleetEvaluation(report={})

    # -- scoring and metrics -------------------------------------------------------------------------------------

    def _record(self, name: str, outputs: dict[str, ModelOutput], **facts: Any) -> None:
        """Normalise per device, take the detector's flags or threshold calibration scores, pool, and store the
        metrics of one model."""
        fixed, recent, normalised, flags, p_values, thresholds, rule_flags = {}, {}, {}, {}, {}, {}, {}
        own_z, own_z_missing = False, 0
        for d in self.devices:
            out = outputs[d]
            normalise = robust_normaliser(out.calibration)
            fixed[d] = normalise(out.test)
            recent[d] = (rolling_robust_z(out.calibration, out.test, self.pooling_window, self.micro_batch)
                         if self.pooling_window else fixed[d])
            normalised[d] = recent[d]
            if self.own_z and out.z_scores is not None:  # what the detector emitted; all recent scores stand in
                missing = ~np.isfinite(out.z_scores)       # where it had none (a threshold just reset by a drift)
                normalised[d] = np.where(missing, recent[d], out.z_scores)
                own_z, own_z_missing = True, own_z_missing + int(np.count_nonzero(missing))
            thresholds[d] = operating_threshold(normalise(out.calibration), self.threshold_cfg)
            rule_flags[d] = fixed[d] > thresholds[d]
            flags[d] = rule_flags[d] if out.flags is None else np.asarray(out.flags, dtype=bool)
            p_values[d] = (out.p_values if out.p_values is not None
                           else calibration_p_values(out.calibration, out.test))
        y = np.concatenate([self.test[d][1] for d in self.devices])
        all_flags = np.concatenate([flags[d] for d in self.devices])
        pooled = detection_metrics_from_flags(y, np.concatenate([normalised[d] for d in self.devices]), all_flags)
        if self.pooling_window:   # the figures a fixed calibration would give, for comparison
            by_calibration = detection_metrics_from_flags(y, np.concatenate([fixed[d] for d in self.devices]),
                                                          all_flags)
            pooled["fixed_calibration"] = {k: by_calibration[k] for k in ("roc_auc", "pr_auc", "best_f1")}
        if own_z:   # the figures pooled on all recent scores (`rolling_robust_z`), for comparison
            by_recent = detection_metrics_from_flags(y, np.concatenate([recent[d] for d in self.devices]), all_flags)
            pooled["all_recent"] = {k: by_recent[k] for k in ("roc_auc", "pr_auc", "best_f1")}
            pooled["own_z_missing"] = own_z_missing
        counts = {d: event_counts(self.test[d][1], flags[d], self.incident_gap) for d in self.devices}
        pooled.update(event_metrics({k: sum(c[k] for c in counts.values()) for k in next(iter(counts.values()))}))
        per_device = {d: {**detection_metrics_from_flags(self.test[d][1], normalised[d], flags[d]),
                          **event_metrics(counts[d])} for d in self.devices}
        device_mean = {k: float(np.nanmean([m[k] for m in per_device.values()]))
                       if not all(math.isnan(m[k]) for m in per_device.values()) else math.nan
                       for k in per_device[self.devices[0]]}
        for d in self.devices:
            per_device[d]["flag_rate"] = float(np.mean(flags[d]))
            per_device[d]["calibration_threshold"] = thresholds[d]
        if any(outputs[d].flags is not None for d in self.devices):
            # The same operating rule as the baselines' (threshold fit on calibration scores), for comparison.
            ruled = detection_metrics_from_flags(y, np.concatenate([fixed[d] for d in self.devices]),
                                                 np.concatenate([rule_flags[d] for d in self.devices]))
            pooled.update({f"{k}_calibration_rule": ruled[k] for k in ("f1", "precision", "recall")})
        self.result.report.setdefault("models", {})[name] = {
            **pooled, "flag_rate": float(np.mean(np.concatenate(list(flags.values())))),
            "per_device_mean": device_mean, "per_device": per_device, **facts}
        self.result.scores[name] = normalised
        self.result.raw_scores[name] = {d: outputs[d].test for d in self.devices}
        self.result.flags[name] = flags
        self.result.p_values[name] = p_values
        self.say(f"{name:<22} roc_auc={pooled['roc_auc']:.3f} pr_auc={pooled['pr_auc']:.3f} "
                 f"f1={pooled['f1']:.3f} best_f1={pooled['best_f1']:.3f} incident_f1={pooled['incident_f1']:.3f}"
                 + (f" (stuck-metric incidents: {facts['stuck_incidents']})" if facts.get("stuck_incidents") else ""))

    def _score_all(self, model_of: Callable[[str], Any], method: str = "score_many") -> dict[str, ModelOutput]:
        outputs = {}
        for d in self.devices:
            score = getattr(model_of(d), method)
            outputs[d] = ModelOutput(score(self.calibration[d]), score(self.test[d][0]))
        return outputs

    # -- detectors as the stream runs them -------------------------------------------------------------------------

    def _stream(self, detectors: dict[str, Any], federate: bool) -> tuple[dict[str, ModelOutput], dict]:
        """Every device's detector scores then learns its whole series (fit, calibration, test) in micro-batches,
        devices in lockstep; with `federate`, a round of snapshots → aggregation → adoption every `round_every`
        readings per device."""
        series = {d: np.vstack([self.fit[d], self.calibration[d], self.test[d][0]]) for d in self.devices}
        scores = {d: np.empty(len(X)) for d, X in series.items()}
        flags = {d: np.zeros(len(X), dtype=bool) for d, X in series.items()}
        p_values = {d: np.full(len(X), math.nan) for d, X in series.items()}
        z_scores = {d: np.full(len(X), math.nan) for d, X in series.items()}
        longest = max(len(X) for X in series.values())
        facts: dict[str, Any] = {"rounds": 0, "bytes_per_round": 0, "drift_events": 0, "incidents": 0}
        for start in range(0, longest, self.micro_batch):
            for d, X in series.items():
                if start < len(X):
                    stop = min(start + self.micro_batch, len(X))
                    result = detectors[d].process_many(X[start:stop], seqs=np.arange(start, stop),
                                                       ts=None if self.times is None else self.times[d][start:stop])
                    scores[d][start:stop] = result.scores
                    flags[d][start:stop] = result.is_anomaly
                    p_values[d][start:stop] = result.p_values
                    z_scores[d][start:stop] = result.z_scores
            done = start + self.micro_batch
            if federate and done // self.round_every > start // self.round_every and done < longest:
                self._federated_round(detectors, series, done, facts)
        outputs = {}
        for d, X in series.items():
            n_fit, n_cal = len(self.fit[d]), len(self.calibration[d])
            calibration, test = slice(n_fit, n_fit + n_cal), slice(n_fit + n_cal, len(X))
            outputs[d] = ModelOutput(scores[d][calibration], scores[d][test], flags[d][test], p_values[d][test],
                                     z_scores[d][test])
        facts["drift_events"] = int(sum(det.n_drift_events for det in detectors.values()))
        facts["incidents"] = int(sum(det.n_incidents for det in detectors.values()))
        facts["stuck_incidents"] = int(sum(getattr(det, "n_stuck_incidents", 0) for det in detectors.values()))
        return outputs, facts

    def _federated_round(self, detectors: dict[str, Any], series: dict[str, np.ndarray], done: int,
                         facts: dict) -> None:
        """Snapshot the devices still streaming, aggregate their snapshots' federated vectors, adopt the result."""
        active = [d for d in self.devices if len(series[d]) >= done]
        updates, like, codec, upload = [], None, None, 0
        for d in active:
            snap = detectors[d].snapshot()
            weights, meta = loads(snap["weights"])
            like, codec = weights, codec_for(meta["architecture"])
            upload += len(snap["weights"])
            updates.append(Update(d, [codec.federated_vector(weights)], n_samples=snap["n_samples"],
                                  version=snap["version"]))
        try:
            aggregated = self.strategy.aggregate(updates)
        except AggregationError as exc:  # e.g. too few devices still streaming: as in the job, no new model
            facts["rounds_skipped"] = facts.get("rounds_skipped", 0) + 1
            facts["last_skip_reason"] = str(exc)
            return
        facts["rounds"] += 1
        clusters = aggregated.extra.get("clusters", {})
        cluster_weights = aggregated.extra.get("cluster_weights")
        global_weights = codec.weights_from_vector(aggregated.weights[0], like)
        for d in active:  # every device adopts, as in the stream job (a rejected update does not exclude a device)
            if cluster_weights is not None and d in clusters:
                adopted = codec.weights_from_vector(cluster_weights[clusters[d]][0], like)
            else:
                adopted = global_weights
            share = detectors[d].adopt_global(adopted, facts["rounds"])
            facts["adoptions"] = facts.get("adoptions", 0) + 1
            facts["adopted_share_sum"] = facts.get("adopted_share_sum", 0.0) + float(share)
            facts["adoptions_kept_own"] = facts.get("adoptions_kept_own", 0) + int(share == 0.0)
        # Every participant uploads its snapshot and downloads the new global model (same size as a snapshot).
        facts["bytes_per_round"] = 2 * upload
        facts["model_bytes"] = _model_bytes(global_weights)

    def _stream_model(self, name: str, federate: bool = False, shared: bool = False) -> None:
        detectors = {d: self.model_factory() for d in self.devices}
        if shared:
            model = detectors[self.devices[0]].model
            for det in detectors.values():
                det.model = model
        outputs, facts = self._stream(detectors, federate)
        if not federate:
            facts = {k: v for k, v in facts.items() if k not in ("rounds", "bytes_per_round", "model_bytes")}
        else:
            facts["strategy"] = type(self.strategy).__name__
            facts.update(adoption_settings(detectors[self.devices[0]]))
            # Share of the global model blended in per adoption (blend: the missing part of the target share).
            facts["mean_adopted_share"] = facts.pop("adopted_share_sum", 0.0) / max(facts.get("adoptions", 0), 1)
            self.result.report["bytes_per_round"] = facts["bytes_per_round"]
            self.result.report["model_bytes"] = facts.get("model_bytes")
        self._record(name, outputs, protocol="stream", **facts)
        self._record_components(name, detectors)

    def _record_components(self, name: str, detectors: dict[str, Any]) -> None:
        """Per device, the subspace model's scoring components and the share of variance they explain; warn when
        the tracked rank caps k below the explained-variance rule (`SubspaceModel.rank_bound`)."""
        models = {d: det.model for d, det in detectors.items() if hasattr(det.model, "rank_bound")}
        if not models:
            return
        report = self.result.report["models"][name]
        for d, model in models.items():
            report["per_device"][d].update(components=int(model.k), explained_variance=model.explained_ratio)
        bound = [d for d in self.devices if d in models and models[d].rank_bound]
        report["rank_bound_devices"] = bound
        if bound:
            model = models[bound[0]]
            ratios = ", ".join(f"{d} {models[d].explained_ratio:.3f}" for d in bound[:5])
            self.say(f"{name}: model.subspace.rank {model.rank} caps k on {len(bound)} of {len(models)} devices "
                     f"(explained {ratios}{' …' if len(bound) > 5 else ''} < {model.explained_variance:.2f}): the rest "
                     "counts as residual; a larger rank (FLEAD_MODEL_SUBSPACE_RANK) restores the rule, and "
                     "bench/injected.py --train says whether it detects better on this fleet")

    # -- detectors in the batch protocol --------------------------------------------------------------------------

    def _batch_local(self) -> None:
        models = {}
        for i, d in enumerate(self.devices):
            models[d] = self.model_factory()
            for _ in range(self.rounds * self.local_epochs):
                models[d].learn_many(self.fit[d])
            if (i + 1) % max(1, len(self.devices) // 4) == 0:
                self.say(f"local: {i + 1}/{len(self.devices)} devices trained")
        self._record("local", self._score_all(models.__getitem__), protocol="batch", bytes_per_round=0)

    def _batch_federated(self) -> None:
        models = {d: self.model_factory() for d in self.devices}
        codec = codec_for(models[self.devices[0]].architecture)
        global_weights = None
        round_bytes = 0
        for r in range(1, self.rounds + 1):
            updates = []
            for d, model in models.items():
                if global_weights is not None:
                    model.set_weights(global_weights)
                for _ in range(self.local_epochs):
                    model.learn_many(self.fit[d])
                updates.append(Update(d, [codec.federated_vector(model.get_weights())], n_samples=len(self.fit[d]),
                                      version=r))
            like = models[self.devices[0]].get_weights()
            aggregated = self.strategy.aggregate(updates)
            global_weights = codec.weights_from_vector(aggregated.weights[0], like)
            # Every participant uploads its model and downloads the new global one.
            round_bytes = 2 * len(updates) * _model_bytes(global_weights)
            losses = [m.loss for m in models.values() if getattr(m, "loss", None) is not None]
            mean_loss = np.mean(losses) if losses else math.nan
            self.say(f"federated round {r}/{self.rounds}: {len(aggregated.participants)} participants, "
                     f"{len(aggregated.rejected)} rejected, mean local loss {mean_loss:.4f}")
        for model in models.values():
            model.set_weights(global_weights)
        facts = {"protocol": "batch", "bytes_per_round": round_bytes, "rounds": self.rounds,
                 "strategy": aggregated.strategy}
        self._record("federated", self._score_all(models.__getitem__), **facts)
        if self.finetune_epochs:
            for d, model in models.items():
                for _ in range(self.finetune_epochs):
                    model.learn_many(self.fit[d])
            self._record("federated_finetuned", self._score_all(models.__getitem__),
                         finetune_epochs=self.finetune_epochs, **facts)
        self.result.report["bytes_per_round"] = round_bytes
        self.result.report["model_bytes"] = _model_bytes(global_weights)

    def _batch_centralized(self) -> None:
        model = self.model_factory()
        chunks = {d: [X[i:i + CENTRALIZED_CHUNK] for i in range(0, len(X), CENTRALIZED_CHUNK)]
                  for d, X in self.fit.items()}
        longest = max(len(c) for c in chunks.values())
        interleaved = [chunks[d][k] for k in range(longest) for d in self.devices if k < len(chunks[d])]
        for epoch in range(self.rounds * self.local_epochs):
            for chunk in interleaved:
                model.learn_many(chunk)
        raw_bytes = int(sum(X.nbytes for X in self.fit.values()))
        self._record("centralized", self._score_all(lambda d: model), protocol="batch", bytes_total=raw_bytes)

    # -- baselines ------------------------------------------------------------------------------------------------

    def run_per_device_baseline(self, name: str, make: Callable[[int], Any]) -> None:
        fitted = {d: make(self.seed + i).fit(self.fit[d]) for i, d in enumerate(self.devices)}
        self._record(name, self._score_all(fitted.__getitem__, method="score"))

    def run(self, models: tuple[str, ...] = ALL_MODELS) -> FleetEvaluation:
        stream = self.protocol == "stream"
        runners = {
            "federated": (lambda: self._stream_model("federated", federate=True)) if stream else self._batch_federated,
            "local": (lambda: self._stream_model("local")) if stream else self._batch_local,
            "centralized": (lambda: self._stream_model("centralized", shared=True)) if stream
            else self._batch_centralized,
            "isolation_forest": lambda: self.run_per_device_baseline(
                "isolation_forest", lambda seed: IsolationForestScores(seed=seed)),
            "pca": lambda: self.run_per_device_baseline("pca", lambda seed: PCAScores()),
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
        detectors = ("the detector's own online threshold (score, then learn, every reading)" if stream
                     else f"threshold {self.threshold_cfg.get('kind')} on calibration scores")
        self.result.report.update({
            "devices": len(self.devices), "protocol": self.protocol, "test_rows": int(len(y)),
            "anomaly_rate": float(y.mean()) if len(y) else math.nan, "incident_gap": self.incident_gap,
            **({"micro_batch": self.micro_batch, "round_every": self.round_every,
                **adoption_settings(self.model_factory())} if stream else {"rounds": self.rounds,
                                                                    "local_epochs": self.local_epochs}),
            "normalisation": ((f"detectors: the robust z they emit (against their last {self.pooling_window} "
                               "scores without an incident's episode); others: " if self.own_z and stream else "")
                              + (f"rolling robust z per device: each micro-batch of {self.micro_batch} against its "
                                 f"last {self.pooling_window} scores, calibration scores first" if self.pooling_window
                                 else "robust z per device from calibration scores")),
            "operating_flags": f"detectors: {detectors}; baselines: threshold {self.threshold_cfg.get('kind')} "
                               "on calibration scores"})
        return self.result


def adoption_settings(detector: Any) -> dict:
    """How `detector` adopts global models (``global_policy``, ``blend_weight``), for reports; empty for models
    without detector settings."""
    settings = getattr(detector, "settings", None)
    if settings is None:
        return {}
    return {"global_policy": settings.adoption_policy, "blend_weight": settings.adoption_blend_weight}


def evaluate_fleet(train: Train, test: Test, model_factory: Callable[[], Any], rounds: int = 10,
                   local_epochs: int = 1, **options: Any) -> FleetEvaluation:
    """Compare local, federated, centralized, Isolation Forest, PCA, DBSCAN and random on one split (module
    docstring).

    ``train``: device → X (n, d); ``test``: device → (X, y). ``model_factory()`` returns a fresh, identically
    seeded `DeviceDetector` (or any model with ``process_many`` / ``snapshot`` / ``adopt_global`` for the stream
    protocol, ``learn_many`` / ``score_many`` / ``get_weights`` / ``set_weights`` / ``architecture`` for the
    batch one). ``options``: ``protocol`` (stream | batch), ``micro_batch``, ``round_every``, ``incident_gap``,
    ``pooling_window`` (0: pool on robust z from calibration scores; W: `rolling_robust_z` over the last W scores),
    ``own_z`` (with W: detectors on the z they emit; `orchestration.evaluate_cli.pooling_options` names them),
    ``times`` (device → (training, test) event times in epoch ms, given to the detectors in the stream protocol;
    needed with ``model.features.time_of_day``),
    ``strategy`` (default `FedAvg()`), ``finetune_epochs``, ``validation_fraction``, ``threshold_cfg``,
    ``extra_models`` (name → factory of a ``fit``/``score`` detector, run per device), ``seed``, ``progress``,
    ``models`` (which of `ALL_MODELS` to run).
    """
    models = options.pop("models", ALL_MODELS)
    return FleetEvaluator(train, test, model_factory, rounds, local_epochs, **options).run(tuple(models))
