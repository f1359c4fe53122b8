"""The runnable examples in the docstrings of models/ (River-style) and of other modules stay true (monitoring/'s:
tests/unit/test_monitoring_rules.py)."""
import doctest
import importlib

import pytest

MODULES = ["autoencoder", "baselines", "dbscan", "detector", "drift", "features", "federation", "incidents",
           "lstm_autoencoder", "metrics", "optim", "residuals", "scaler", "serialization", "stuck", "subspace",
           "thresholds"]


OTHER_MODULES = ["config", "orchestration.demo", "scoring.feedback", "spark_jobs.evaluate_job", "spark_jobs.session",
                 "spark_jobs.topic_window", "storage.buckets", "storage.mongo", "storage.rollups", "storage.summaries",
                 "telemetry.readers", "telemetry.schema"]


@pytest.mark.parametrize("name", [f"models.{m}" for m in MODULES] + OTHER_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
