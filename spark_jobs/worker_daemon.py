"""Spark's Python worker daemon (`spark.python.daemon.module`), importing the installed PySpark rather than the
copy Spark puts first on every Python process's path.

Spark puts ``pyspark.zip`` and ``py4j-*-src.zip`` (its ``python/lib``) ahead of everything on the PYTHONPATH of the
job's driver and of each executor's worker daemon. The zips hold sources only, and Python does not cache bytecode
for a zip: every process compiled PySpark again, ~0.45 s of each spark-submit's critical path here (a worker daemon
importing ``pyspark.daemon`` took 0.59 s from the zip, 0.15 s installed). When the same version is installed (its
``version.py`` identical), `prefer_installed` moves the zip behind it; else the zip stays where Spark put it.
This module imports nothing from PySpark itself, so that it can choose before anything does.
"""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

BUNDLED = {"pyspark.zip": "pyspark", "py4j-": "py4j"}  # a Spark python/lib zip's name (prefix) -> its package


def _bundled_package(entry: str) -> str | None:
    """The package a path entry is Spark's zip of (``pyspark``, ``py4j``), or None."""
    name = Path(entry).name
    if not name.endswith(".zip"):
        return None
    return next((package for prefix, package in BUNDLED.items() if name.startswith(prefix)), None)


def _zipped_version(entry: str, package: str) -> bytes | None:
    try:
        with zipfile.ZipFile(entry) as archive:
            return archive.read(f"{package}/version.py")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


def _installed_version(entries: list[str], package: str) -> bytes | None:
    for entry in entries:
        try:
            return (Path(entry) / package / "version.py").read_bytes()
        except OSError:
            continue
    return None


def prefer_installed(path: list[str]) -> list[str]:
    """``path`` (a `sys.path`) with each of Spark's bundled zips moved to the end when the same version of its
    package is installed in another entry of it; unchanged otherwise."""
    unzipped = [entry for entry in path if _bundled_package(entry) is None]
    moved = []
    for entry in path:
        package = _bundled_package(entry)
        if package is not None:
            version = _zipped_version(entry, package)
            if version is not None and version == _installed_version(unzipped, package):
                moved.append(entry)
    return [entry for entry in path if entry not in moved] + moved


def use_installed_pyspark() -> None:
    """`prefer_installed` on this process's `sys.path`, before PySpark is imported (no effect after)."""
    sys.path[:] = prefer_installed(sys.path)


if __name__ == "__main__":  # python -m spark_jobs.worker_daemon: what Spark runs for spark.python.daemon.module
    use_installed_pyspark()
    from pyspark.daemon import manager

    manager()
