"""One device's anomaly detector: features → running scaler → model → normalised residuals → online threshold,
with conformal p-values, incidents and a drift monitor.

This is the keyed state of the stream job and the unit of evaluation. Only the model's weights are federated
(`get_weights`, `set_weights`, `adopt_global`); the scaler, the feature buffer, the residual scales, the
threshold, the incident tracker and the drift monitor stay local.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from models.autoencoder import DenseAutoencoder, check_weight_shapes
from models.drift import DriftEvent, DriftMonitor
from models.features import TIME_OF_DAY_MEAN, TIME_OF_DAY_VARIANCE, FeatureBuilder, time_of_day, time_of_day_inputs
from models.federation import blend_weights, validated_blend
from models.incidents import STUCK, Incident, IncidentBatch, IncidentTracker
from models.lstm_autoencoder import LSTMAutoencoder
from models.residuals import ResidualScale, largest_shares, metric_shares
from models.scaler import RunningScaler, conversion
from models.serialization import SerializationError, dumps, loads
from models.stuck import StuckBatch, StuckMonitor
from models.subspace import SubspaceModel
from models.thresholds import OnlineThreshold, make_threshold, threshold_from_arrays

ARCHITECTURE = "flead.device-detector/4"  # format of `to_bytes` (/2: residual scales, drift, incidents, subspace;
#                                            /3: recent readings for the validated adoption policy; /4: stuck monitor)
READABLE_ARCHITECTURES = ("flead.device-detector/2", "flead.device-detector/3", ARCHITECTURE)  # /2: no recent
#                                            readings; /2 and /3: a stuck monitor that learns afresh
KINDS = ("subspace", "ae", "lstm_ae")
ADOPTION_POLICIES = ("replace", "blend", "validated", "prior")  # stream.global_policy
SCORE_INPUTS = ("reading", "all")  # model.scoring.inputs: which inputs' residuals make the score
# Learning is winsorised: once the scaler has seen PLAUSIBLE_AFTER readings, a value further than
# max(PLAUSIBLE_SIGMAS, sqrt(n)) standard deviations from its mean (n: readings the scaler has learned) is learned as
# that bound (it is still scored as it is, and flagged). The bound is the bounded-influence rule: no single reading
# may add more to an input's sum of squared deviations than the n readings before it together (n sigma^2), so one
# absurd value (1e20) at most doubles a variance, however long the device has run. A fixed 10 sigma is not "beyond
# any normal fluctuation" for server telemetry whose metrics sit still for days and then step: on ASD's training
# series it clipped 280-810 values per device (sqrt(n): 26 median). A lasting change of level beyond the bound is
# taken up after the drift monitor re-baselines. Scaled inputs are also capped at MAX_SCALED_VALUE when scored, so
# a reading at the input limit (models.features.MAX_ABS_INPUT; beyond it a value counts as missing) gives a huge but
# finite score.
PLAUSIBLE_SIGMAS = 10.0
PLAUSIBLE_AFTER = 30
MAX_SCALED_VALUE = 1e6
THRESHOLD_START_FRACTION = 0.5  # scores of the first half of warm-up come from a barely trained model and would
#                                 inflate the threshold and the residual scales: they learn only from later ones

# Settings read from sections other than `model.*` / `threshold.*`: field -> (section path, key).
NESTED_SETTINGS = {
    "subspace_window": ("model.subspace", "window"), "explained_variance": ("model.subspace", "explained_variance"),
    "subspace_rank": ("model.subspace", "rank"), "subspace_half_life": ("model.subspace", "half_life"),
    "bounded_influence": ("model.subspace", "bounded_influence"),
    "normalise_residuals": ("model.scoring", "normalise"), "score_inputs": ("model.scoring", "inputs"),
    "residual_half_life": ("model.scoring", "half_life"),
    "residual_floor": ("model.scoring", "floor"),
    "drift_enabled": ("drift", "enabled"), "drift_block_readings": ("drift", "block_readings"),
    "drift_blocks": ("drift", "blocks"), "drift_alpha": ("drift", "alpha"),
    "incident_gap_readings": ("incidents", "gap_readings"), "incident_gap_ms": ("incidents", "gap_ms"),
    "stuck_enabled": ("stuck", "enabled"), "stuck_longer_than": ("stuck", "longer_than"),
    "stuck_min_repeats": ("stuck", "min_repeats"), "stuck_metrics": ("stuck", "metrics"),
    "adoption_policy": ("stream", "global_policy"), "adoption_blend_weight": ("stream", "blend_weight"),
    "adoption_candidates": ("model.adoption", "candidates"),
    "adoption_readings": ("model.adoption", "validation_readings"),
    "adoption_prior_readings": ("model.adoption", "prior_readings"),
    "adoption_given_time_of_day": ("model.adoption", "given_time_of_day"),
}


#: Settings a device that has learned can take at any time (a changed configuration applies to it on restore,
#: `DeviceDetector.reconfigure`); every other setting shapes its features or model and stays as it was created.
TUNABLE_SETTINGS = ("warmup", "warmup_per_input", "top_k_metrics", "threshold_kind", "target_false_alarm_rate",
                    "sigma_k", "history", "drift_enabled", "drift_alpha", "incident_gap_readings", "incident_gap_ms",
                    "stuck_enabled", "stuck_longer_than", "stuck_min_repeats", "stuck_metrics", "adoption_policy",
                    "adoption_blend_weight", "adoption_candidates", "adoption_readings", "adoption_prior_readings",
                    "adoption_given_time_of_day", "subspace_half_life", "residual_half_life", "bounded_influence")
THRESHOLD_SETTINGS = ("threshold_kind", "target_false_alarm_rate", "sigma_k", "history")


@dataclass(frozen=True)
class DetectorSettings:
    """Every setting the detector uses: `model.*` (features flattened), `threshold.*` (`kind` as
    `threshold_kind`), and the fields of `NESTED_SETTINGS` (`model.subspace.*`, `model.scoring.*`, `drift.*`,
    `incidents.*`) of the configuration."""

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
    subspace_window: int = 5
    explained_variance: float = 0.9
    subspace_rank: int = 16
    subspace_half_life: float = 0.0
    bounded_influence: bool = False  # the subspace model learns each reading with weight min(1, cut / score)
    normalise_residuals: bool = True
    score_inputs: str = "all"
    residual_half_life: float = 0.0
    residual_floor: float = 0.1
    drift_enabled: bool = True
    drift_block_readings: int = 72
    drift_blocks: int = 4
    drift_alpha: float = 1e-3
    incident_gap_readings: int = 10
    incident_gap_ms: int = 0
    stuck_enabled: bool = False   # False in states from before it, until `reconfigure` gives them the configured one
    stuck_longer_than: float = 2.0
    stuck_min_repeats: int = 5
    stuck_metrics: tuple[str, ...] = ()  # the metrics watched for being stuck (empty: all)
    adoption_policy: str = "blend"
    adoption_blend_weight: float = 0.5
    adoption_candidates: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    adoption_readings: int = 64
    adoption_prior_readings: int = 500
    adoption_given_time_of_day: bool = False  # the subspace model blends in global models given the time of day
    warmup_per_input: float = 0.0  # 0 in states from before it, until `reconfigure` gives them the configured one
    time_of_day: bool = False  # two more inputs per reading, the phase of its UTC day (False in states from before)
    time_of_day_harmonics: int = 1  # ... 2 per harmonic of the day: a Fourier series of the daily shape

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "DetectorSettings":
        """Read the configuration, then apply keyword `overrides` (field names of this class)."""
        model, threshold = cfg.model, cfg.threshold
        features = model.features
        values = {f.name: getattr(model, f.name) for f in dataclasses.fields(cls)
                  if f.name in model and f.name != "features" and f.name not in NESTED_SETTINGS}
        values.update({name: features[name] for name in ("rolling_windows", "lags", "rate_of_change", "time_of_day",
                                                        "time_of_day_harmonics")})
        values.update({name: threshold[name] for name in ("target_false_alarm_rate", "sigma_k", "warmup", "history",
                                                         "warmup_per_input")})
        values["threshold_kind"] = threshold.kind
        for name, (path, key) in NESTED_SETTINGS.items():
            section = cfg
            for part in path.split("."):
                section = section[part]
            values[name] = section[key]
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown detector setting(s) {unknown}; known: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "DetectorSettings":
        tuples = ("hidden", "rolling_windows", "lags")
        values = {k: tuple(int(x) for x in v) if k in tuples else v for k, v in values.items()}
        if "stuck_metrics" in values:
            values["stuck_metrics"] = tuple(str(name) for name in values["stuck_metrics"])
        if "adoption_candidates" in values:
            values["adoption_candidates"] = tuple(float(b) for b in values["adoption_candidates"])
        return cls(**values)

    def to_dict(self) -> dict:
        """The settings as plain JSON values (tuples as lists). Every field is a number, a string or a tuple of
        them, so no deep copy is needed (`dataclasses.asdict`'s was half of serialising a detector's state)."""
        return {name: list(value) if type(value) is tuple else value
                for name, value in ((f.name, getattr(self, f.name)) for f in _SETTING_FIELDS)}

    def tunable(self) -> tuple:
        """The values of `TUNABLE_SETTINGS`, in that order."""
        return tuple(getattr(self, name) for name in TUNABLE_SETTINGS)

    @property
    def feature_lags(self) -> tuple[int, ...]:
        """Lags the feature builder adds: the configured ones, and for the subspace kind its causal window
        (lags 1 … window − 1: the window of the last `subspace_window` readings, flattened)."""
        window = range(1, self.subspace_window) if self.kind == "subspace" else ()
        return tuple(sorted(set(self.lags) | set(window)))


_SETTING_FIELDS = dataclasses.fields(DetectorSettings)


@dataclass
class DetectionResult:
    """What `process_many` returns for a batch of n readings."""

    scores: np.ndarray           # (n,) anomaly score: mean of the squared residuals, each divided by its typical one
    thresholds: np.ndarray       # (n,) the cut each score was compared with (inf while no cut is fitted)
    is_anomaly: np.ndarray       # (n,) bool; all False while the device is warming up
    top_metrics: list            # n lists of (metric, share of the reading's normalised residuals), largest first
    n_imputed: int               # non-finite values imputed in this batch
    p_values: np.ndarray = field(default_factory=lambda: np.zeros(0))   # (n,) conformal p-value, NaN in warm-up
    z_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))   # (n,) robust z, NaN in warm-up
    metric_shares: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (n, metrics) shares of blame
    incident_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,) start_seq
    #                              of the reading's incident (`models.incidents.incident_id`), -1 if not flagged
    incidents: list = field(default_factory=list)  # `Incident` states that changed in this batch, in time order
    drift: DriftEvent | None = None  # a drift detected in this batch (the device re-baselined after the batch)
    n_muted: int = 0  # flags the `mute` callable of `process_many` dropped
    stuck_incident_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (n,)
    #                              start_seq of the reading's stuck-metric incident (kind ``stuck``), -1 if none
    stuck_metrics: list = field(default_factory=list)  # n lists of (metric, repeats, usual longest run) of the
    #                              metrics stuck at each reading flagged stuck (`models.stuck`), empty for the others;
    #                              both empty (length 0) when nothing is stuck in the batch (or the monitor is off)


Muting = Callable[[np.ndarray, np.ndarray, np.ndarray, Mapping[int, list]], np.ndarray]


class DeviceDetector:
    """Score, then learn, a device's readings; flag scores above an online threshold after a warm-up; group flags
    into incidents; watch the flag rate for drift.

    Create with `create`; see docs/contracts.md for the contract. Scores are honest out-of-sample errors: a
    batch is scored before anything (scaler, model, residual scales, threshold) learns from it. Every reading
    is learned, flagged or not (learning only from unflagged readings was tried: after a change of regime every
    reading is flagged and nothing is learned again).

    The score is the mean of the model's squared residuals, each divided by the device's typical residual for
    that input (`models.residuals.ResidualScale`); the metrics to blame are the shares of those normalised
    residuals, inputs derived from a metric (window lags, rolling statistics) counted for it. Kinds: ``subspace``
    (`models.subspace.SubspaceModel` over a causal window of readings), ``ae`` (`DenseAutoencoder`), ``lstm_ae``
    (`LSTMAutoencoder`).

    >>> import numpy as np
    >>> from config import load_config
    >>> det = DeviceDetector.create(["cpu", "mem", "disk"], load_config(), kind="subspace", warmup=100, seed=0)
    >>> rng = np.random.default_rng(0)
    >>> load = rng.normal(0.5, 0.1, size=(400, 1))
    >>> normal = np.hstack([load, 0.5 * load + 0.2, 1.0 - load]) + rng.normal(0, 0.01, size=(400, 3))
    >>> ts = 300_000 * np.arange(401)                      # event times (epoch ms): a reading every 5 minutes
    >>> flagged = sum(det.process_many(normal[i:i + 16], ts=ts[i:i + 16]).is_anomaly.sum() for i in range(0, 400, 16))
    >>> res = det.process_many(np.array([[0.5, 0.45, 0.9]]), seqs=[400], ts=ts[400:])  # disk breaks its relation
    >>> bool(res.is_anomaly[0]), res.top_metrics[0][0][0], round(float(res.p_values[0]), 4)
    (True, 'disk', 0.0032)
    >>> res.incidents[0].status, res.incidents[0].start_seq, int(res.incident_starts[0])
    ('open', 400, 400)
    >>> DeviceDetector.from_bytes(det.to_bytes()).n_seen
    401
    """

    def __init__(self, metric_names: Sequence[str], settings: DetectorSettings):
        if settings.kind not in KINDS:
            raise ValueError(f"model.kind: unknown model {settings.kind!r} (known: {', '.join(KINDS)})")
        if settings.score_inputs not in SCORE_INPUTS:
            raise ValueError(f"model.scoring.inputs: unknown {settings.score_inputs!r} (known: "
                             f"{', '.join(SCORE_INPUTS)})")
        if settings.time_of_day and settings.time_of_day_harmonics < 1:
            raise ValueError(f"model.features.time_of_day_harmonics must be >= 1, got {settings.time_of_day_harmonics}")
        self.metric_names = list(metric_names)
        self._metric_name_array = np.array(self.metric_names, dtype=object)  # for indexing by top-k positions
        self.settings = s = settings
        # The model's inputs per reading: its metrics, then (model.features.time_of_day) the phase of its day.
        self.input_names = self.metric_names + (time_of_day_inputs(s.time_of_day_harmonics) if s.time_of_day else [])
        self.features = FeatureBuilder(self.input_names, s.rolling_windows, s.feature_lags, s.rate_of_change,
                                       s.nan_policy)
        self.scaler = RunningScaler()
        self._pin_time_of_day()
        self.model = _make_model(s)
        self.model.initialize(self.features.n_features)
        self.residual_scale = ResidualScale(s.residual_half_life, s.residual_floor,
                                            recent_half_life=s.drift_block_readings)
        self.threshold = _make_threshold(s)
        self.drift = DriftMonitor(s.target_false_alarm_rate, s.drift_block_readings, s.drift_blocks, s.drift_alpha)
        self.incidents = IncidentTracker(self.metric_names, s.incident_gap_readings, s.incident_gap_ms,
                                         s.top_k_metrics)
        self.stuck = StuckMonitor(len(self.metric_names), s.stuck_longer_than, s.stuck_min_repeats,
                                  self.warmup_readings)
        self.stuck_incidents = IncidentTracker(self.metric_names, s.incident_gap_readings, s.incident_gap_ms,
                                               s.top_k_metrics, kind=STUCK)
        self._stuck_watched = self._watched(s)
        self.n_seen = 0
        self.n_winsorised = 0  # values learned at the plausibility bound since this object was made
        self.model_version = 0
        self.global_version = 0
        self._n_since_snapshot = 0
        self._loss: float | None = None  # mean squared residual of the last batch (models without their own loss)
        check_adoption(s)
        self._recent_kept = self._readings_to_hold(s)
        self.held_readings = np.zeros((0, len(self.input_names)), dtype=np.float32)

    def _pin_time_of_day(self) -> None:
        """With the time of day, the scaler keeps its sine and cosine (and their lags) at their moments over a day,
        mean 0 and variance 1/2: a device that has seen only part of a day would scale them by that part's spread,
        and they would move as a ramp of several of their standard deviations until the day is full."""
        if self.settings.time_of_day:
            self.scaler.pin(self.features.value_columns(range(len(self.metric_names), len(self.input_names))),
                            TIME_OF_DAY_MEAN, TIME_OF_DAY_VARIANCE)

    def _watched(self, s: DetectorSettings) -> np.ndarray | None:
        """Which metrics `stuck.metrics` watches, as a mask (None: all)."""
        return np.isin(self.metric_names, s.stuck_metrics) if s.stuck_metrics else None

    def _readings_to_hold(self, s: DetectorSettings) -> int:
        """The validated adoption policy's held data: the last `adoption_readings` readings (and the window before
        them), float32, raw; kept only under that policy."""
        return (s.adoption_readings + self.features.memory
                if s.adoption_policy == "validated" and s.adoption_readings > 0 else 0)

    def reconfigure(self, settings: DetectorSettings) -> bool:
        """Take the `TUNABLE_SETTINGS` of `settings` (a changed configuration, for a device restored from state
        made under the old one), keeping what was learned: the threshold refits on its recent scores under its new
        kind and rate, the drift monitor keeps its counted blocks, the open incident stays open, the model and
        residual scales forget at their new half-lives from now on. Settings that shape features or model are kept
        as they were. Returns whether anything changed."""
        tuned = dataclasses.replace(self.settings, **dict(zip(TUNABLE_SETTINGS, settings.tunable())))
        if tuned == self.settings:
            return False
        check_adoption(tuned)
        if any(getattr(tuned, n) != getattr(self.settings, n) for n in THRESHOLD_SETTINGS):
            threshold = _make_threshold(tuned)
            threshold.history.extend(self.threshold.history.values())
            threshold.refit()
            self.threshold = threshold
        self.drift.retune(tuned.target_false_alarm_rate, tuned.drift_alpha)
        if tuned.kind == "subspace":
            self.model.set_half_life(tuned.subspace_half_life)
        self.residual_scale.set_half_life(tuned.residual_half_life)
        for tracker in (self.incidents, self.stuck_incidents):
            tracker.gap_readings, tracker.gap_ms = tuned.incident_gap_readings, tuned.incident_gap_ms
            tracker.top_k = tuned.top_k_metrics
        if tuned.stuck_enabled and not self.settings.stuck_enabled:  # an idle monitor learned nothing: start afresh
            self.stuck = StuckMonitor(len(self.metric_names), tuned.stuck_longer_than, tuned.stuck_min_repeats,
                                      self.warmup_readings)
        self.stuck.longer_than, self.stuck.min_repeats = float(tuned.stuck_longer_than), int(tuned.stuck_min_repeats)
        self._stuck_watched = self._watched(tuned)
        self._recent_kept = self._readings_to_hold(tuned)
        if not self._recent_kept:
            self.held_readings = self.held_readings[:0]
        self.settings = tuned
        return True

    @classmethod
    def create(cls, metric_names: Sequence[str], cfg: Any, **overrides: Any) -> "DeviceDetector":
        """A fresh detector for readings with `metric_names`, set up from `cfg` (a `config.Config`: its `model`,
        `threshold`, `drift`, `incidents` sections) and keyword `overrides` of `DetectorSettings` fields
        (``kind="ae"``, ``warmup=50``, ``threshold_kind=...``)."""
        return cls(metric_names, DetectorSettings.from_config(cfg, **overrides))

    # -- scoring and learning ---------------------------------------------------------------------------------

    @property
    def loss(self) -> float | None:
        """Training loss of the network's last optimiser step; for the subspace model, the mean squared residual
        of the last batch learned (before learning it)."""
        return getattr(self.model, "loss", self._loss)

    @property
    def n_drift_events(self) -> int:
        return self.drift.n_events

    @property
    def rank_bound(self) -> bool:
        """Whether the subspace model's tracked rank caps its k below the explained-variance rule
        (`SubspaceModel.rank_bound`); False for the other kinds."""
        return bool(getattr(self.model, "rank_bound", False))

    @property
    def n_incidents(self) -> int:
        """Incidents opened so far, of the score and of stuck metrics."""
        return self.incidents.n_incidents + self.stuck_incidents.n_incidents

    @property
    def n_stuck_incidents(self) -> int:
        """Incidents of stuck metrics opened so far (`models.stuck`)."""
        return self.stuck_incidents.n_incidents

    def _readings(self, X: np.ndarray) -> np.ndarray:
        X = np.array(X, dtype=np.float64, ndmin=2, copy=None)  # read, never kept or changed
        if X.shape[1] != len(self.metric_names):
            raise ValueError(f"expected {len(self.metric_names)} metrics ({', '.join(self.metric_names)}), "
                             f"got {X.shape[1]} columns")
        if X.shape[0] == 0:
            raise ValueError("empty batch: give at least one reading")
        return X

    def model_inputs(self, X: np.ndarray, ts: Sequence[int] | None = None) -> np.ndarray:
        """The model's inputs of readings `X` (n, metrics), before features: the metrics, then with
        ``model.features.time_of_day`` the phase of each reading's day, from its event time `ts` (epoch ms), which
        is then required."""
        return self._inputs(self._readings(X), ts)

    def _inputs(self, X: np.ndarray, ts: Sequence[int] | None) -> np.ndarray:
        """`model_inputs` of readings `X` already checked by `_readings`."""
        if not self.settings.time_of_day:
            return X
        if ts is None or len(ts) != X.shape[0]:
            raise ValueError(f"model.features.time_of_day needs every reading's event time (ts, epoch ms): got "
                             f"{'none' if ts is None else len(ts)} for {X.shape[0]} readings")
        return np.hstack([X, time_of_day(ts, self.settings.time_of_day_harmonics)])

    @property
    def _scored_blocks(self) -> int:
        """Feature blocks whose residuals make the score: with ``model.scoring.inputs: all`` (the default) every
        input, the window's older readings included; with ``reading`` only the first block, the reading's own
        metric values (its window's lags and derived features still shape the reconstruction)."""
        return 1 if self.settings.score_inputs == "reading" else self.features.blocks

    def _errors(self, F: np.ndarray, model: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For feature rows `F` (current scaler, residual scales, and `model` or the detector's own): squared
        residuals of every input, the normalised squared residuals of the scored inputs, and the scores.

        Scoring every input of a window (the default, as issue 12 specifies it) also scores the window's older
        readings again: one anomalous reading raises the scores of the `window` − 1 readings after it too (an
        isolated spike gives up to `window` flags, at most one of them right), while a sustained anomaly is seen
        from several angles. ``inputs: reading`` scores only the reading's own values."""
        scaled = self.scaler.transform_batch(F)  # no unit assumed for a metric's first move
        np.minimum(scaled, MAX_SCALED_VALUE, out=scaled)  # scores stay finite for any finite input (np.clip's
        np.maximum(scaled, -MAX_SCALED_VALUE, out=scaled)  # result, without its slower scalar loop)
        errors = (self.model if model is None else model).feature_errors(scaled)
        scored = errors[:, :self._scored_blocks * len(self.input_names)]
        normalised = self.residual_scale.normalise(scored) if self.settings.normalise_residuals else scored
        return errors, normalised, np.add.reduce(normalised, axis=1) / normalised.shape[1]

    def score_many(self, X: np.ndarray, ts: Sequence[int] | None = None) -> np.ndarray:
        """Anomaly score of each reading (`ts`: their event times, epoch ms, needed with
        ``model.features.time_of_day``); changes no state (apart from the model's lazy set-up)."""
        return self._errors(self.features.transform_many(self.model_inputs(X, ts)))[2]

    def learn_many(self, X: np.ndarray, seqs: Sequence[int] | None = None, ts: Sequence[int] | None = None) -> None:
        """Learn from the readings: everything `process_many` changes (features, scaler, model, residual scales,
        threshold, incidents, drift), without building the result."""
        self._process(X, seqs, ts, describe=False)

    def process_many(self, X: np.ndarray, seqs: Sequence[int] | None = None,
                     ts: Sequence[int] | None = None, mute: Muting | None = None) -> DetectionResult:
        """Score the batch against the current threshold, then learn from it.

        `seqs` / `ts`: the readings' sequence numbers and event times (epoch ms), for incidents and drift events
        (default: readings counted from 0, no times). `mute(scores, thresholds, is_anomaly, top_metrics)` (e.g.
        an operator's false-positive patterns, `scoring.feedback.mute_mask`) returns which flags to drop before
        incidents and drift see them; ``top_metrics[i]`` is given for the flagged readings."""
        return self._process(X, seqs, ts, describe=True, mute=mute)

    def process_one(self, x: np.ndarray, seq: int | None = None, ts: int | None = None) -> DetectionResult:
        return self.process_many(np.asarray(x, dtype=np.float64)[None, :], None if seq is None else [seq],
                                 None if ts is None else [ts])

    def _process(self, X: np.ndarray, seqs, ts, describe: bool, mute: Muting | None = None
                 ) -> DetectionResult | None:
        X = self._readings(X)
        n = X.shape[0]
        inputs = self._inputs(X, ts)
        imputed_before = self.features.n_imputed
        F = self.features.transform_and_learn_many(inputs)  # features as before the batch: scoring sees no learning
        if self._recent_kept:
            self.held_readings = np.concatenate((self.held_readings, inputs.astype(np.float32)))[-self._recent_kept:]
        errors, normalised, scores = self._errors(F)
        cut = self.threshold.threshold
        score_flags = scores > cut
        warmup = self.warmup_readings
        warming = self.n_seen < warmup
        if warming:
            score_flags &= self.n_seen + np.arange(n) >= warmup
        own_flags = score_flags
        runs = self.stuck.update(X) if self.settings.stuck_enabled else None   # models.stuck (off by default)
        if runs is not None and self._stuck_watched is not None:   # only the metrics watched
            runs = dataclasses.replace(runs, stuck=runs.stuck & self._stuck_watched)
        stuck_flags = None if runs is None else runs.stuck.any(axis=1)
        flagged = score_flags if stuck_flags is None else score_flags | stuck_flags
        # Shares of blame of every reading (describe), or of the flagged ones only (learning: only they are needed).
        rows = slice(None) if describe else np.flatnonzero(flagged)
        shares = metric_shares(normalised[rows], self._scored_blocks, len(self.metric_names))
        if stuck_flags is not None:  # a reading flagged only for stuck metrics: they share the blame
            only = (stuck_flags & ~score_flags)[rows]
            if only.any():
                held = runs.stuck[rows][only]
                shares[only] = held / held.sum(axis=1, keepdims=True)

        def flagged_shares(mask: np.ndarray) -> np.ndarray:
            return shares[mask] if describe else shares[np.searchsorted(rows, np.flatnonzero(mask))]
        # Muting (an operator's false-positive patterns) changes what is reported (flags, incidents), not what
        # is learned: the residual scales, the threshold and the drift monitor see the score's own flags, so a
        # muted pattern cannot make later, stronger anomalies of the same metrics look normal.
        muted = None
        if mute is not None and flagged.any():
            top = dict(zip(np.flatnonzero(flagged).tolist(), self._top_metrics(flagged_shares(flagged))))
            muted = np.asarray(mute(scores, np.full(n, cut), flagged, top), dtype=bool) & flagged
            score_flags = score_flags & ~muted
            stuck_flags = None if stuck_flags is None else stuck_flags & ~muted
        is_anomaly = score_flags if stuck_flags is None else score_flags | stuck_flags
        seqs = self.n_seen + np.arange(n) if seqs is None else np.asarray(seqs, dtype=np.int64)
        ts = None if ts is None else np.asarray(ts, dtype=np.int64)
        thresholds = np.full(n, cut)
        versions = (self.model_version, self.global_version)
        incidents = self.incidents.update(score_flags, scores, thresholds, flagged_shares(score_flags), seqs, ts,
                                          *versions)
        stuck_incidents = self._stuck_incidents(runs, stuck_flags, scores, thresholds, seqs, ts, versions)
        drift = None
        if self.settings.drift_enabled:
            detected = self.drift.update(own_flags)
            if detected is not None:
                at, rate = detected
                drift = DriftEvent(int(seqs[at]), None if ts is None else int(ts[at]), self.drift.describe(),
                                   rate, self.settings.target_false_alarm_rate, self.drift.window)
        result = None
        if describe:
            p_values, z_scores = self.threshold.p_values(scores), self.threshold.robust_z(scores)
            if warming:
                early = self.n_seen + np.arange(n) < warmup
                p_values[early] = z_scores[early] = math.nan
            result = DetectionResult(scores=scores, thresholds=thresholds, is_anomaly=is_anomaly,
                                     top_metrics=self._top_metrics(shares),
                                     n_imputed=self.features.n_imputed - imputed_before, p_values=p_values,
                                     z_scores=z_scores, metric_shares=shares, incident_starts=incidents.starts,
                                     incidents=incidents.changes, drift=drift,
                                     n_muted=0 if muted is None else int(np.count_nonzero(muted)))
            if stuck_incidents is not None:
                result.incidents += stuck_incidents.changes
                result.stuck_incident_starts = stuck_incidents.starts
                result.stuck_metrics = self._stuck_metrics(runs, stuck_flags)
        calibration = (~incidents.during | ((incidents.ranks > 0) & (incidents.ranks <= self.calibration_run))
                       if incidents.during.any() else None)  # None: all (no incident in the batch)
        if muted is not None and (muted & own_flags).any():
            calibration = ~(muted & own_flags) if calibration is None else calibration & ~(muted & own_flags)
        self._learn(F, errors, scores, calibration=calibration)
        if drift is not None:
            self._rebaseline()
        return result

    @property
    def warmup_readings(self) -> int:
        """Readings before any alert: `threshold.warmup`, and at least `threshold.warmup_per_input` per input of the
        model. A covariance of d inputs, or a network of as many, is still settling for the first several d readings
        (a rule of thumb for estimating one: at least 5 d), and the residual scales learned meanwhile would measure
        that settling, not the device: scores then creep up for thousands of readings as those early residuals
        weigh less, and a young device's threshold lags behind them (a drift declared in its first days)."""
        return max(self.settings.warmup, math.ceil(self.settings.warmup_per_input * self.features.n_features))

    @property
    def calibration_run(self) -> int:
        """Flags of one incident that still count as calibration evidence for the threshold: as many as readings
        one reading can push above the cut (the window it is part of). Normal exceedances come alone or in such
        short clumps; the rest of a longer incident is an anomaly episode, and learning the threshold from it
        would raise the cut it is judged by (a device 5 % anomalous under a 1 % target would have only 1 % of its
        readings flagged). A lasting new regime is left to the drift monitor, which resets the threshold."""
        reach = self.features.memory + 1
        return reach + self.settings.window - 1 if self.settings.kind == "lstm_ae" else reach

    def _learn(self, F: np.ndarray, errors: np.ndarray, scores: np.ndarray, calibration: np.ndarray | None) -> None:
        """Learn from the features `F` of readings the feature buffer has already taken, their squared residuals
        `errors` and `scores` (both from before learning): scaler, then model (on the updated scaling), then
        residual scales (every reading, winsorised at the cut: `_winsorising`), then the threshold from the
        scores marked `calibration` (None: every score)."""
        n = F.shape[0]
        start = int(self.warmup_readings * THRESHOLD_START_FRACTION)
        F, n_winsorised = self.scaler.winsorise(F, max(PLAUSIBLE_SIGMAS, math.sqrt(self.scaler.n)), PLAUSIBLE_AFTER)
        self.n_winsorised += n_winsorised
        units = self.scaler.units() if hasattr(self.model, "rescale") else None  # (the autoencoders do not)
        self.scaler.learn_many(F)
        moved = None if units is None else conversion(units, self.scaler.units())
        if moved is not None:  # what the model learned, in the units it will score in
            self.model.rescale(*moved)
        scaled = self.scaler.transform_batch(F)  # F is learned: only its constant inputs change (0)
        if self.settings.bounded_influence and isinstance(self.model, SubspaceModel):  # as the residual scales below
            self.model.learn_many(scaled, weights=self._winsorising(scores))
        else:
            self.model.learn_many(scaled)
        self._loss = float(np.add.reduce(errors, axis=None)) / errors.size
        first = max(0, start - self.n_seen)  # rows from here on are past the start
        if first:  # before the start the residual scales learn too: scores need a scale meanwhile
            self.residual_scale.learn_many(errors[:first])
        if first < n:
            if 0 < start and self.n_seen <= start:  # the start is in this batch: forget the early residuals
                self.residual_scale.restart()
            self.residual_scale.learn_many(errors[first:], cap=self._winsorising(scores[first:]))
            self.threshold.update_many(scores[first:] if calibration is None else scores[first:][calibration[first:]])
        if moved is not None:  # the residuals above were in the former units
            self.residual_scale.rescale(moved[0])
        self.n_seen += n
        self._n_since_snapshot += n

    def _winsorising(self, scores: np.ndarray) -> np.ndarray | None:
        """Per reading, the factor its squared residuals are learned with by the residual scales: ``cut / score``
        above the current cut, else 1 (None while there is no cut). Every reading is learned (no gate on flags),
        and none weighs more than a reading at the cut: a bounded-influence (winsorised) RMS."""
        cut = self.threshold.threshold
        above = scores > cut
        if not math.isfinite(cut) or not above.any():
            return None
        cap = np.ones(scores.shape[0])
        cap[above] = cut / scores[above]   # scores above a cut >= 0 are > 0
        return cap

    def _rebaseline(self) -> None:
        """After a drift: residual scales from the recent residuals, the threshold from scores to come, and the
        subspace model's statistics worth no more than the drift window, so that recent readings dominate."""
        window = self.drift.window
        self.scaler.rebaseline(window)
        self.residual_scale.rebaseline(window)
        self.threshold.reset()
        if isinstance(self.model, SubspaceModel):
            self.model.rebaseline(window)

    def _stuck_incidents(self, runs: StuckBatch | None, stuck_flags: np.ndarray | None, scores: np.ndarray,
                         thresholds: np.ndarray, seqs: np.ndarray, ts: np.ndarray | None, versions: tuple
                         ) -> IncidentBatch | None:
        """The batch's incidents of stuck metrics (their own tracker: the score's incidents, which the threshold's
        calibration follows, never see these flags); None when the monitor is off and no such incident is open."""
        if runs is None or not (self.stuck_incidents.is_open or stuck_flags.any()):
            if not self.stuck_incidents.is_open:
                return None   # the usual case: nothing stuck, nothing open
            n = scores.shape[0]   # turned off during an incident: it resolves after its gap
            return self.stuck_incidents.update(np.zeros(n, dtype=bool), scores, thresholds, np.zeros((0, 0)), seqs,
                                               ts, *versions)
        held = runs.stuck[stuck_flags]
        return self.stuck_incidents.update(stuck_flags, scores, thresholds,
                                           held / np.maximum(1, held.sum(axis=1, keepdims=True)), seqs, ts,
                                           *versions, stuck=(np.where(held, runs.repeats[stuck_flags], 0),
                                                             runs.usual))

    def _stuck_metrics(self, runs: StuckBatch | None, stuck_flags: np.ndarray | None) -> list:
        """Per reading, ``(metric, repeats, usual longest run)`` of each metric stuck at it, if it is flagged stuck."""
        out: list = [[] for _ in range(len(stuck_flags))] if stuck_flags is not None else []
        if runs is not None and stuck_flags.any():
            for i in np.flatnonzero(stuck_flags).tolist():
                out[i] = [(self.metric_names[j], int(runs.repeats[i, j]), int(runs.usual[j]))
                          for j in np.flatnonzero(runs.stuck[i])]
        return out

    def expire_incidents(self, now_ts: int) -> list[Incident]:
        """Resolve the open incidents if `incidents.gap_ms` passed since their last flag (a device gone silent)."""
        return self.incidents.expire(now_ts) + self.stuck_incidents.expire(now_ts)

    def top_metrics(self, normalised_errors: np.ndarray) -> list[list[tuple[str, float]]]:
        """Per reading, the `top_k_metrics` metrics with the largest share of its normalised squared residuals
        (derived inputs count for their metric); ties go to the metric listed first."""
        return self._top_metrics(metric_shares(normalised_errors, self.features.blocks, len(self.metric_names)))

    def _top_metrics(self, shares: np.ndarray) -> list[list[tuple[str, float]]]:
        n = shares.shape[0]
        top, values = largest_shares(shares, self.settings.top_k_metrics)
        pairs = list(zip(self._metric_name_array[top].ravel().tolist(), values.ravel().tolist()))
        k = top.shape[1]
        if values.all():
            return [pairs[i:i + k] for i in range(0, n * k, k)]
        return [[pair for pair in pairs[i:i + k] if pair[1] > 0] for i in range(0, n * k, k)]  # blame none

    # -- federation ---------------------------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        """The model's architecture string (equal strings: compatible weights; `models.federation` codecs)."""
        return self.model.architecture

    def get_weights(self) -> list[np.ndarray]:
        """What a snapshot carries: the network's weights, or the subspace model's factor, mean and variances
        (float32)."""
        return self.model.get_weights()

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.model.set_weights(weights)

    def adopt_global(self, weights: list[np.ndarray], version: int) -> float:
        """Take a global model by the adoption policy of the detector's settings (`stream.global_policy`; a changed
        configuration reaches a restored device through `reconfigure`): ``replace`` the weights, or ``blend`` them, ``(1 − b)·local + b·global`` in the
        federated space of `models.federation` (network weights; for the subspace model the mean and second
        moment, i.e. the covariances, not the factors), or ``validated``: blend by the share among
        `adoption_candidates` whose model has the lowest median score on the device's last `adoption_readings`
        readings (`models.federation.validated_blend`; label-free; `blend_weight` until it has held readings: only a
        detector created under that policy holds them), or
        ``prior``: blend as if the global model were a prior worth `adoption_prior_readings` readings, share
        ``prior / (prior + readings the device has learned)`` (MAP adaptation: a new device leans on the fleet, a
        device with much data of its own on itself; the networks blend their weights by that share each round).
        Returns the share of the global model blended in now.

        With the time of day among a subspace model's inputs and `adoption_given_time_of_day`, every blend is
        `models.federation.blend_subspace_given` (the device's and the fleet's differing daily shapes do not count
        as variance of its metrics).

        For the subspace model `blend_weight` is the global models' share of the device's statistics after the
        adoption: its statistics still hold part of the global models adopted before (decayed by the readings
        learned since), so only the missing part is blended in. Blending b of each new global model every round
        would compound: with a round every 500 readings and a half-life of 2000, a device would keep only ~14 %
        of its own statistics instead of 1 − b. Optimiser moments, residual scales and the threshold are kept:
        they describe the device and re-adapt.
        """
        s = self.settings
        policy, blend_weight = s.adoption_policy, s.adoption_blend_weight
        local = self.get_weights()
        check_weight_shapes(local, weights)
        subspace = isinstance(self.model, SubspaceModel)
        validation_error = self._validation_error() if policy == "validated" else None
        if policy == "replace":
            self.set_weights(weights)
            if subspace:
                self.model.global_share = 1.0
            blend_weight = 1.0
        elif validation_error is not None:
            blend_weight, chosen, _ = validated_blend(local, weights, s.adoption_candidates,
                                                      validation_error, self.architecture, self._covariate_inputs())
            if blend_weight > 0.0:
                self.set_weights(chosen)
            if subspace:
                self.model.global_share += blend_weight * (1.0 - self.model.global_share)
        else:   # blend, prior, or validated without held readings
            if policy == "prior":   # the global model is a prior worth `adoption_prior_readings` readings
                own = self.model.weight if subspace else float(self.n_seen)
                prior = float(s.adoption_prior_readings)
                blend_weight = prior / (prior + own) if prior > 0 else 0.0
            if subspace:
                held = self.model.global_share
                missing = 0.0 if held >= blend_weight else (blend_weight - held) / (1.0 - held)
                if missing > 0.0:   # else nothing to take: the model stays exactly as it is
                    self.set_weights(blend_weights(local, weights, missing, self.architecture,
                                                   self._covariate_inputs()))
                self.model.global_share = max(held, blend_weight)
                blend_weight = missing
            else:
                self.set_weights(blend_weights(local, weights, blend_weight, self.architecture))
        self.global_version = int(version)
        return blend_weight

    def _covariate_inputs(self) -> np.ndarray | None:
        """The subspace model's inputs a global model is blended in given (`model.adoption.given_time_of_day`: the
        time of day's, with their lags; `models.federation.blend_subspace_given`), as a boolean mask; None: none."""
        s = self.settings
        if not (s.adoption_given_time_of_day and s.time_of_day and isinstance(self.model, SubspaceModel)):
            return None
        mask = np.zeros(self.features.n_features, dtype=bool)
        mask[self.features.value_columns(range(len(self.metric_names), len(self.input_names)))] = True
        return mask

    def _validation_error(self) -> Callable[[Sequence[np.ndarray]], float] | None:
        """Weights ↦ the median score a model with those weights gives the device's held recent readings (its
        current scaler and residual scales; the median, because those readings are unlabelled and may hold
        anomalies); None while fewer than `adoption_readings` / 2 readings are held."""
        memory = self.features.memory
        if self.held_readings.shape[0] - memory < max(1, self.settings.adoption_readings // 2):
            return None
        s = self.settings
        builder = FeatureBuilder(self.input_names, s.rolling_windows, s.feature_lags, s.rate_of_change, "impute")
        F = builder.transform_and_learn_many(self.held_readings.astype(np.float64))[memory:]
        probe = copy.deepcopy(self.model)

        def error(weights: Sequence[np.ndarray]) -> float:
            probe.set_weights(list(weights))
            return float(np.median(self._errors(F, probe)[2]))
        return error

    def snapshot(self) -> dict:
        """A new local model version for the aggregator: weights (serialised) and the readings learned since the
        previous snapshot (the FedAvg weight)."""
        self.model_version += 1
        snap = {"n_samples": self._n_since_snapshot, "loss": self.loss, "version": self.model_version,
                "global_version": self.global_version,
                "weights": dumps(self.get_weights(), {"architecture": self.architecture,
                                                      "model_version": self.model_version,
                                                      "global_version": self.global_version})}
        self._n_since_snapshot = 0
        return snap

    # -- persistence --------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state (settings, feature buffer, scaler, model, residual scales, threshold, drift monitor,
        incident tracker, stuck monitor, counters)."""
        loss = math.nan if self.loss is None else self.loss
        counters = np.array([self.n_seen, self.model_version, self.global_version, self._n_since_snapshot, loss])
        arrays = [counters, self.features.to_array(), self.scaler.to_array(), self.residual_scale.to_array(),
                  *self.threshold.to_arrays(), self.drift.to_array(), self.incidents.to_array(), self.held_readings,
                  *self._stuck_state(), *self.model.get_state()]
        return dumps(arrays, {"architecture": ARCHITECTURE, "model_version": self.model_version,
                              "network": self.architecture, "metric_names": self.metric_names,
                              "settings": self.settings.to_dict()})

    def _stuck_state(self) -> list[np.ndarray]:
        """The stuck monitor's and its incident tracker's arrays; empty while the monitor is off (it learns nothing
        then, and is made afresh when turned on), so a device without it keeps the state it had before it."""
        empty = np.zeros(0)
        monitor = self.stuck.to_array() if self.settings.stuck_enabled else empty
        tracker = self.stuck_incidents.to_array() if self.settings.stuck_enabled or self.stuck_incidents.is_open \
            else empty
        return [monitor, tracker]

    @classmethod
    def from_bytes(cls, blob: bytes) -> "DeviceDetector":
        arrays, meta = loads(blob)
        if meta.get("architecture") not in READABLE_ARCHITECTURES:
            raise SerializationError(f"not a device detector state of this version: architecture "
                                     f"{meta.get('architecture')!r}, expected {ARCHITECTURE!r}")
        det = cls(meta["metric_names"], DetectorSettings.from_dict(meta["settings"]))
        if meta["architecture"] == "flead.device-detector/2":   # no recent readings
            arrays = [*arrays[:8], np.zeros((0, len(det.input_names)), dtype=np.float32), *arrays[8:]]
        if meta["architecture"] != ARCHITECTURE:   # no stuck monitor
            arrays = [*arrays[:9], None, None, *arrays[9:]]
        (counters, features, scaler, residual_scale, threshold_head, threshold_scores, drift, incidents, recent,
         stuck, stuck_incidents, *model) = arrays
        det.n_seen, det.model_version, det.global_version, det._n_since_snapshot = (int(c) for c in counters[:4])
        det.features = FeatureBuilder.from_array(features, det.input_names)
        det.scaler = RunningScaler.from_array(scaler)
        det._pin_time_of_day()
        det.residual_scale = ResidualScale.from_array(residual_scale)
        det.threshold = threshold_from_arrays([threshold_head, threshold_scores])
        det.drift = DriftMonitor.from_array(drift)
        det.incidents = IncidentTracker.from_array(incidents, det.metric_names)
        det.held_readings = np.asarray(recent, dtype=np.float32).reshape(-1, len(det.input_names))
        if stuck is not None and stuck.size:   # else the new one learns runs for a warm-up of its own readings
            det.stuck = StuckMonitor.from_array(stuck)
        if stuck_incidents is not None and stuck_incidents.size:
            det.stuck_incidents = IncidentTracker.from_array(stuck_incidents, det.metric_names, kind=STUCK)
        det.model.set_state(model)
        loss = None if math.isnan(counters[4]) else float(counters[4])
        if hasattr(det.model, "loss"):
            det.model.loss = loss
        else:
            det._loss = loss
        return det


def _make_threshold(s: DetectorSettings) -> OnlineThreshold:
    return make_threshold({"kind": s.threshold_kind, "target_false_alarm_rate": s.target_false_alarm_rate,
                           "sigma_k": s.sigma_k, "history": s.history})


def check_adoption(s: DetectorSettings) -> None:
    """Refuse an unknown adoption policy or a blend weight outside [0, 1], naming the setting."""
    if s.adoption_policy not in ADOPTION_POLICIES:
        raise ValueError(f"stream.global_policy: unknown policy {s.adoption_policy!r} (known: "
                         f"{', '.join(ADOPTION_POLICIES)})")
    if not 0.0 <= s.adoption_blend_weight <= 1.0:
        raise ValueError(f"stream.blend_weight must be in [0, 1], got {s.adoption_blend_weight}")


def _make_model(s: DetectorSettings) -> SubspaceModel | DenseAutoencoder | LSTMAutoencoder:
    if s.kind == "subspace":
        return SubspaceModel(s.explained_variance, s.subspace_rank, s.subspace_half_life)
    if s.kind == "ae":
        return DenseAutoencoder(s.hidden, s.activation, s.optimizer, s.learning_rate, s.batch_size, s.grad_clip,
                                s.seed)
    return LSTMAutoencoder(s.window, s.lstm_hidden, s.optimizer, s.learning_rate, s.batch_size, s.grad_clip, s.seed)
