"""What the stream job changes in its Python workers' runtime when its operator opens (`DeviceScorer.open`).

PyFlink's Python workers run Beam's SDK harness. Two of its costs are not the job's work (flink_jobs/README.md,
"Beam's state-sampling thread, off" and "The workers' start-up objects, frozen"):

- **Beam's state-sampling thread.** For every bundle, Beam's `StateSampler` starts a thread that wakes up every
  2 ms (growing by 1.2× per wake-up to 200 ms) to add the elapsed time to the current step's counter, and at the
  bundle's end `stop` joins it: the bundle thread waits until the sampler next wakes up and gets the GIL back
  (5–25 ms per bundle here), while the JVM waits for the bundle's output. The times it gathers feed Beam's own
  progress reports (per-step ``msecs`` counters, lull logging), which Flink does not read.
  `without_sampling_thread` makes `start` and `stop` do their bookkeeping only (the tracker through which each
  step's counters and the job's `ScorerCounters` find their metrics container; the ``started``/``finished``
  flags), without the thread. Scoped states and metrics containers run on the bundle thread, unchanged. A sampler
  whose thread was started before the change is still stopped and joined as before.
  `stream.bundle_state_sampling: true` keeps Beam's behaviour.
- **Python's cyclic garbage collector over the start-up objects.** A worker holds ~150,000 objects once its
  operator is open (Beam, gRPC, PyFlink, the job's modules), all of them alive for the worker's life; each
  full collection went through all of them (~100 ms, about every 8 s while scoring), holding the GIL.
  `freeze_startup_objects` moves them into the collector's permanent generation (`gc.freeze`), so full
  collections look only at objects made later. Objects made afterwards (device states, records) are collected
  as before. `stream.freeze_worker_startup_objects: false` leaves the collector alone.
"""
from __future__ import annotations

import gc
import threading

THREADLESS = "_flead_threadless"  # set on a sampler started without its thread (in its instance dict)


def without_sampling_thread(sampler_class, set_current_tracker) -> bool:
    """Make ``sampler_class`` (Beam's ``statesampler.StateSampler``) start and stop without its sampling thread;
    ``set_current_tracker`` is Beam's ``statesampler.set_current_tracker``. Idempotent; returns whether the class
    was changed by this call."""
    if getattr(sampler_class, THREADLESS, False):
        return False
    threaded_stop = sampler_class.stop

    def start(self) -> None:
        self.tracked_thread = threading.current_thread()
        set_current_tracker(self)
        self.started = True
        self.__dict__[THREADLESS] = True

    def stop(self) -> None:
        if self.__dict__.pop(THREADLESS, False):
            set_current_tracker(None)
            self.finished = True
        else:  # started with its thread (before this change): stop and join it as Beam does
            threaded_stop(self)

    sampler_class.start, sampler_class.stop = start, stop
    setattr(sampler_class, THREADLESS, True)
    return True


def freeze_startup_objects() -> int:
    """Move every object the collector tracks now into its permanent generation (`gc.freeze`), after collecting
    what is already garbage (so none of it is kept for good). Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
