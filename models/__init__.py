"""FLEAD's pure-NumPy model core: no Flink, Spark or Kafka in here (NumPy and the standard library only).

Per-device detection (River-style: ``learn_one``/``score_one`` and ``*_many`` batch twins, lazy set-up):

- `models.detector.DeviceDetector` — ``create(metric_names, cfg=None, **overrides)``, ``process_many(X)``
  (score, then learn) → `DetectionResult` (scores, thresholds, is_anomaly, top_metrics, n_imputed),
  ``score_many``, ``learn_many``, ``to_bytes``/``from_bytes``, ``get_weights``/``set_weights``,
  ``adopt_global(weights, version, policy, blend_weight)``, ``snapshot()``; settings in `DetectorSettings`.
- `models.features.FeatureBuilder` — rolling mean/std, lags, rate of change; NaN policy (impute | reject,
  `NonFiniteMetricError`).
- `models.scaler.RunningScaler` — running mean/variance (Welford; Chan for batches).
- `models.autoencoder.DenseAutoencoder`, `models.lstm_autoencoder.LSTMAutoencoder` — the networks
  (``feature_errors``, ``loss_and_gradients``, ``get_state``/``set_state``); `models.optim` — Adam, SGD,
  clipping by global norm.
- `models.thresholds` — `SigmaThreshold`, `QuantileThreshold`, `PotThreshold` (SPOT), ``make_threshold(cfg)``,
  ``threshold_from_array(state)``.
- `models.dbscan.DBSCANDetector` — density-based detector over error vectors (distance to nearest core point).
- `models.serialization` — ``dumps(weights, meta) -> bytes``, ``loads(blob, expected_shapes=None)``,
  ``to_b64``/``from_b64``, `SerializationError`. No pickle.
"""
