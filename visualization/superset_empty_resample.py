"""Let a chart whose time series gets resampled (the dashboards' way of drawing gaps as gaps) show an empty result.

Superset 6.1's ``resample`` post-processing fails on a frame without a valid timestamp ("'NaTType' object has no
attribute 'normalize'"), which is what a time series of an empty collection, or of the drill-down before a device
is picked, is. `install()` wraps it: rows without a timestamp are dropped first, and a frame left without rows is
returned as it is.

This file runs inside Superset's virtualenv: the generated ``superset_config.py`` loads it by path and calls
`install()` from ``FLASK_APP_MUTATOR`` (after Superset is imported). It imports only Superset and pandas.
"""
from __future__ import annotations


def install() -> None:
    """Replace ``superset.utils.pandas_postprocessing.resample`` by a version that accepts empty frames."""
    from superset.utils import pandas_postprocessing

    original = pandas_postprocessing.resample
    if getattr(original, "flead_accepts_empty", False):
        return

    def resample(df, *args, **kwargs):
        df = df[df.index.notna()] if hasattr(df.index, "notna") else df
        if df.empty:
            return df
        return original(df, *args, **kwargs)

    resample.flead_accepts_empty = True
    pandas_postprocessing.resample = resample
