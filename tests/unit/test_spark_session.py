"""spark_jobs.session without Spark: stopping a job's context (`stop_without_waiting`, with a stand-in for
PySpark's), and how a job script started by spark-submit (or cron) ends on a bad setting (`run_job`)."""
import logging
import threading
import time

from spark_jobs.session import run_job, stop_without_waiting


class SlowServer:
    """Like PySpark's accumulator server: `shutdown` returns only when its handler next looks (here 1 s)."""

    def __init__(self):
        self.done = threading.Event()

    def shutdown(self):
        time.sleep(1.0)
        self.done.set()


class FakeContext:
    def __init__(self):
        self._accumulatorServer = SlowServer()
        self.stopped_with = "not stopped"

    def stop(self):  # SparkContext.stop() shuts the accumulator server down itself when it still has one
        self.stopped_with = self._accumulatorServer
        if self._accumulatorServer is not None:
            self._accumulatorServer.shutdown()


def test_the_context_stops_at_once_and_the_accumulator_server_after():
    sc = FakeContext()
    server = sc._accumulatorServer
    started = time.perf_counter()
    stop_without_waiting(sc)
    assert time.perf_counter() - started < 0.5
    assert sc.stopped_with is None            # stopped, and not by waiting for the server
    assert server.done.wait(5)                # which still shuts down, on its own thread


def test_a_job_with_a_bad_setting_says_which_in_one_line_and_exits_1(monkeypatch, caplog):
    monkeypatch.setenv("FLEAD_AGGREGATION_SPARK_PARTITIONS", "many")
    started = []
    with caplog.at_level(logging.ERROR):
        assert run_job("flead-test", lambda spark, cfg: started.append(spark)) == 1
    assert not started
    assert [r.getMessage() for r in caplog.records if r.name == "flead-test"] == [
        "aggregation.spark_partitions: cannot read 'many' as int"]
