"""The PyFlink stream job (`anomaly_job.py`), its CLI and a local standalone cluster."""

WORKER_PACKAGES = ("config", "models", "telemetry", "scoring", "flink_jobs")
"""Project packages the job ships to its Python workers (`add_python_file`, `flink run -pyfs`)."""


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_blas_env(cfg) -> dict[str, str]:
    """Environment that caps the BLAS threads of the job's Python workers at `stream.blas_threads` (they inherit
    it from the JVM): with one worker per core, NumPy's default of one thread per core oversubscribes the cores
    (a micro-batch of 64 scored 3-4x slower with 2 threads than with 1 on 2 cores). Empty when the setting is 0."""
    threads = cfg.stream.blas_threads
    return {name: str(threads) for name in BLAS_THREAD_VARIABLES} if threads > 0 else {}


INPUT_FLUSH_PROPERTY = "flead.beam.data_buffer_time_limit_ms"  # read by flink_jobs/beam-patches


def java_options(cfg) -> str:
    """The job JVM's own flags: the Beam input flush period (`stream.input_flush_ms`, read by the patched
    ``BeamFnDataOutboundAggregator`` of `flink_jobs/beam-patches`; 0: Beam's default, size and bundle end only),
    then `stream.jvm_options`."""
    flush = cfg.stream.input_flush_ms
    return " ".join(part for part in (f"-D{INPUT_FLUSH_PROPERTY}={flush}" if flush > 0 else "",
                                      cfg.stream.jvm_options.strip()) if part)


def jvm_args(cfg, given: str = "") -> str:
    """``JVM_ARGS`` for a local run's Flink JVM: `java_options`, then the flags `given` in the environment
    already (HotSpot takes the last of two conflicting flags, so those win)."""
    return " ".join(part for part in (java_options(cfg), given.strip()) if part)
