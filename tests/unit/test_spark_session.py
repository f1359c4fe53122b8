"""Stopping a Spark job's context (`spark_jobs.session.stop_without_waiting`), with a stand-in for PySpark's."""
import threading
import time

from spark_jobs.session import stop_without_waiting


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
