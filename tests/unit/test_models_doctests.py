"""The runnable examples in the docstrings of models/ (River-style) and of other pure modules stay true."""
import doctest
import importlib

import pytest

MODULES = ["autoencoder", "baselines", "dbscan", "detector", "drift", "features", "federation", "incidents",
           "lstm_autoencoder", "metrics", "optim", "residuals", "scaler", "serialization", "subspace", "thresholds"]


OTHER_MODULES = ["storage.buckets", "spark_jobs.evaluate_job"]


@pytest.mark.parametrize("name", [f"models.{m}" for m in MODULES] + OTHER_MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0 and result.attempted > 0
