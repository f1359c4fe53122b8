"""`flink_jobs.python_worker`: Beam's state sampler without its per-bundle thread (on Beam's own classes), the
workers' start-up objects frozen."""
import gc
import threading
import weakref

import pytest

statesampler = pytest.importorskip("apache_beam.runners.worker.statesampler")

from apache_beam.metrics.execution import MetricsContainer, MetricsEnvironment  # noqa: E402
from apache_beam.utils.counters import CounterFactory  # noqa: E402

from flink_jobs.python_worker import freeze_startup_objects, without_sampling_thread  # noqa: E402


def sampler_class():
    """A subclass of Beam's sampler of its own, so that changing it leaves Beam's class (and other tests) alone."""
    return type("Sampler", (statesampler.StateSampler,), {})


def run_bundle(sampler, container) -> None:
    """What Beam's bundle processor does with the sampler around one bundle: start, a step's scope, stop."""
    sampler.start()
    assert statesampler.get_current_tracker() is sampler
    with sampler.scoped_state("step", "process", metrics_container=container):
        assert MetricsEnvironment.current_container() is container  # where the step's counters go
    sampler.stop_if_still_running()
    assert statesampler.get_current_tracker() is None and sampler.finished
    sampler.reset()


def test_a_bundle_starts_no_sampling_thread_and_keeps_the_tracker_and_scopes():
    Sampler = sampler_class()
    assert without_sampling_thread(Sampler, statesampler.set_current_tracker)
    assert not without_sampling_thread(Sampler, statesampler.set_current_tracker)  # once is enough
    sampler, container = Sampler("stage", CounterFactory()), MetricsContainer("step")
    threads = threading.active_count()
    for _ in range(3):
        run_bundle(sampler, container)
        assert threading.active_count() == threads
    assert statesampler.StateSampler.start is not Sampler.start  # Beam's own class unchanged


def test_beams_sampler_starts_a_thread_per_bundle_which_the_change_removes():
    """The reason for the change, checked on this Beam: its sampler starts a thread at every bundle."""
    sampler, container = sampler_class()("stage", CounterFactory()), MetricsContainer("step")
    threads = threading.active_count()
    sampler.start()
    assert threading.active_count() == threads + 1
    sampler.stop()
    assert threading.active_count() == threads
    sampler.reset()
    run_bundle(sampler, container)


def test_a_sampler_started_with_its_thread_before_the_change_is_still_stopped_and_joined():
    Sampler = sampler_class()
    sampler = Sampler("stage", CounterFactory())
    threads = threading.active_count()
    sampler.start()  # a bundle under way when the operator opened
    without_sampling_thread(Sampler, statesampler.set_current_tracker)
    sampler.stop_if_still_running()
    assert threading.active_count() == threads and sampler.finished
    assert statesampler.get_current_tracker() is None


class Cycle:
    def __init__(self):
        self.me = self


def test_freezing_keeps_the_objects_made_before_out_of_full_collections_after_collecting_the_garbage():
    kept, garbage = [object()], Cycle()
    gone = weakref.ref(garbage)
    del garbage
    try:
        assert freeze_startup_objects() > 0
        assert gone() is None  # collected first, not frozen for good
        assert not any(o is kept for o in gc.get_objects())  # in the permanent generation: no collection visits it
        later = [object()]
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
