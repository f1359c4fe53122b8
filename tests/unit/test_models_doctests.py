"""The runnable examples in the docstrings of models/ (River-style) stay true."""
import doctest
import importlib

import pytest

MODULES = ["autoencoder", "baselines", "dbscan", "detector", "drift", "features", "federation", "incidents",
           "lstm_autoencoder", "metrics", "optim", "residuals", "scaler", "serialization", "subspace", "thresholds"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(f"models.{name}"))
    assert result.failed == 0 and result.attempted > 0
