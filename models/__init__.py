"""FLEAD's pure-NumPy model core: no Flink, Spark or Kafka in here (NumPy and the standard library only).

Per-device detection (River-style: ``learn_one``/``score_one`` and ``*_many`` batch twins, lazy set-up):

- `models.detector.DeviceDetector` — ``create(metric_names, cfg=None, **overrides)``, ``process_many(X, seqs,
  ts)`` (score, then learn) → `DetectionResult` (scores, thresholds, is_anomaly, p_values, z_scores, top_metrics,
  metric_shares, incident_starts, incidents, drift, n_imputed), ``score_many``, ``learn_many``,
  ``to_bytes``/``from_bytes``, ``get_weights``/``set_weights``, ``adopt_global(weights, version)``
  (the policy of its settings), ``reconfigure(settings)``, ``snapshot()``, ``expire_incidents(now_ts)``; settings in `DetectorSettings`.
- `models.subspace.SubspaceModel` — online PCA (low-rank covariance with forgetting) over windows: the default.
- `models.residuals.ResidualScale` — each input's typical residual; the score is the mean of squared residuals
  divided by it. `models.incidents.IncidentTracker`, `models.drift.DriftMonitor` — incidents and drift.
- `models.federation` — `SubspaceCodec`, the subspace kind's `models.updates.VectorCodec` (registered when
  `models` is imported, so ``models.updates.codec_for("subspace/...")`` finds it wherever aggregation runs);
  ``blend_weights`` (adoption by blending, in codec space).
- `models.features.FeatureBuilder` — rolling mean/std, lags, rate of change; NaN policy (impute | reject,
  `NonFiniteMetricError`).
- `models.scaler.RunningScaler` — running mean/variance (Welford; Chan for batches).
- `models.autoencoder.DenseAutoencoder`, `models.lstm_autoencoder.LSTMAutoencoder` — the networks
  (``feature_errors``, ``loss_and_gradients``, ``get_state``/``set_state``); `models.optim` — Adam, SGD,
  clipping by global norm.
- `models.thresholds` — `SigmaThreshold`, `QuantileThreshold`, `PotThreshold` (SPOT), ``make_threshold(cfg)``,
  ``threshold_from_arrays(state)``; conformal ``p_values`` and ``robust_z`` against the recent scores.
- `models.dbscan.DBSCANDetector` — density-based detector over error vectors (distance to nearest core point).
- `models.serialization` — ``dumps(weights, meta) -> bytes``, ``loads(blob, expected_shapes=None)``,
  ``to_b64``/``from_b64``, `SerializationError`. No pickle.
"""

from models import federation  # noqa: E402,F401  (registers the subspace codec for `models.updates.codec_for`)
