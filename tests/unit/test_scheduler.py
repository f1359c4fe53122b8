"""The embedded scheduler's run (spark_jobs/scheduler.py) without Spark: a run failing because the scheduler is being
stopped is one log line; any other failure still raises (APScheduler logs it with its traceback)."""
import logging
import threading

import pytest

from config import load_config
from spark_jobs import aggregate_job
from spark_jobs.scheduler import aggregate_then_evaluate


def lost_jvm(*_args, **_kwargs):
    raise ConnectionError("Answer from Java side is empty")


def test_a_run_cut_short_by_stopping_logs_one_line(monkeypatch, caplog):
    monkeypatch.setattr(aggregate_job, "run_round", lost_jvm)
    stopping = threading.Event()
    stopping.set()
    with caplog.at_level(logging.INFO, logger="flead.scheduler"):
        aggregate_then_evaluate(None, load_config(), stopping)
    assert [r.getMessage() for r in caplog.records] == [
        "stopped during a run: what it had not written yet, the next run does again"]


def test_a_run_failing_while_running_raises(monkeypatch):
    monkeypatch.setattr(aggregate_job, "run_round", lost_jvm)
    with pytest.raises(ConnectionError):
        aggregate_then_evaluate(None, load_config(), threading.Event())
