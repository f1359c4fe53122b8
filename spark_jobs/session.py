"""The SparkSession of FLEAD's batch jobs, and the environment its Python workers need."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from config import PROJECT_ROOT, Config


def worker_environment() -> dict[str, str]:
    """Variables that let Spark's Python workers import FLEAD (`models`, `storage`) with this interpreter."""
    path = os.environ.get("PYTHONPATH", "")
    if str(PROJECT_ROOT) not in path.split(os.pathsep):
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), path) if p)
    return {"PYTHONPATH": path, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}


def submitted_master() -> str | None:
    """The master of the spark-submit that runs this script (local[*] if given no ``--master``), else None."""
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # set by spark-submit, whose JVM is already running
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connect to that JVM: until then SparkConf() is empty and sees no master
    return SparkConf().get("spark.master", None)


DRIVER_JAVA_OPTIONS = "--driver-java-options"


def class_archive_option(archive: Path) -> str:
    """The driver JVM's class-data-sharing flag: use ``archive`` when it exists, else write it when the JVM exits
    (Java 17 cannot do both in one run). A JVM whose classpath or version differs from the archive's ignores it."""
    if archive.is_file():
        return f"-XX:SharedArchiveFile={archive}"
    return f"-XX:ArchiveClassesAtExit={archive} -Xlog:cds=error"  # not a warning per class it leaves out (~150)


def submit_options(cfg: Config) -> list[str]:
    """spark-submit's options before the job: `aggregation.spark_submit_options`, with the driver JVM's class
    archive (`aggregation.driver_class_archive`, in the state dir; named by this Spark and Java so an upgrade makes
    a new one) added to its ``--driver-java-options``. Loading Spark's classes from the archive saves ~1 s of a
    spark-submit's start-up here (bench/aggregate.py).

    >>> from config import load_config
    >>> cfg = load_config(env={"FLEAD_AGGREGATION_SPARK_SUBMIT_OPTIONS": '--driver-java-options "-Xss4m"',
    ...                        "FLEAD_AGGREGATION_DRIVER_CLASS_ARCHIVE": "/nonexistent/a.jsa"})
    >>> submit_options(cfg)
    ['--driver-java-options', '-Xss4m -XX:ArchiveClassesAtExit=/nonexistent/a.jsa -Xlog:cds=error']
    """
    import shlex

    words = shlex.split(cfg.aggregation.spark_submit_options)
    name = cfg.aggregation.driver_class_archive
    if not name:
        return words
    archive = Path(name) if Path(name).is_absolute() else cfg.state_dir / f"{Path(name).stem}-{_runtime_tag()}.jsa"
    archive.parent.mkdir(parents=True, exist_ok=True)
    flag = class_archive_option(archive)
    if DRIVER_JAVA_OPTIONS in words[:-1]:
        at = words.index(DRIVER_JAVA_OPTIONS) + 1
        return words[:at] + [f"{words[at]} {flag}"] + words[at + 1:]
    return words + [DRIVER_JAVA_OPTIONS, flag]


def _runtime_tag() -> str:
    """This pyspark's version and the java on PATH (its resolved path): what a class archive belongs to."""
    import hashlib
    import shutil

    import pyspark

    java = os.path.realpath(shutil.which("java") or "java")
    return f"{pyspark.__version__}-{hashlib.sha256(java.encode()).hexdigest()[:8]}"


def spark_conf(cfg: Config, app_name: str, master: str | None = None):
    """The SparkConf of FLEAD's jobs (UI off, Spark's log from warnings up, few shuffle partitions, Python workers
    reused, their daemon `spark_jobs.worker_daemon`: it imports the installed PySpark, not the zip Spark puts first).

    The master is, in order: `master`, the one spark-submit was given (``--master``), `aggregation.spark_master`.
    """
    os.environ.update(worker_environment())  # read by the JVM and the workers it forks (local mode)
    from pyspark import SparkConf

    return (SparkConf().setAppName(app_name)
            .setMaster(master or submitted_master() or cfg.aggregation.spark_master)
            .set("spark.ui.enabled", "false")
            .set("spark.ui.showConsoleProgress", "false")
            .set("spark.log.level", "WARN")
            .set("spark.sql.shuffle.partitions", str(cfg.aggregation.spark_partitions))
            .set("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
            .set("spark.python.worker.reuse", "true")
            .set("spark.python.daemon.module", "spark_jobs.worker_daemon"))


def spark_session(cfg: Config, app_name: str, master: str | None = None):
    """A SparkSession for FLEAD's jobs (`spark_conf`)."""
    from pyspark.sql import SparkSession

    return SparkSession.builder.config(conf=spark_conf(cfg, app_name, master)).getOrCreate()


def new_spark_context(cfg: Config, app_name: str, master: str | None = None):
    """A SparkContext alone (`spark_conf`): what a job that uses RDDs only needs. Skipping the SQL session saves
    1.5-2 s of a spark-submit's start-up here (bench/aggregate.py)."""
    from pyspark import SparkContext

    return SparkContext.getOrCreate(spark_conf(cfg, app_name, master))


def context_of(spark):
    """The SparkContext of ``spark``: a SparkSession's, or ``spark`` itself when it is one."""
    return getattr(spark, "sparkContext", spark)


def stop_without_waiting(spark) -> None:
    """`spark.stop()`, without waiting for PySpark's accumulator server: its request handler looks for the shutdown
    flag once a second (``pyspark.accumulators``), which made every spark-submit ~1 s longer here
    (bench/aggregate.py, ``stop_and_exit_s``). The server is shut down on a daemon thread instead: in a job's
    process, which exits next, that thread simply ends with it."""
    import threading

    sc = context_of(spark)
    server = getattr(sc, "_accumulatorServer", None)
    sc._accumulatorServer = None  # SparkContext.stop() then leaves it alone
    spark.stop()
    if server is not None:
        threading.Thread(target=server.shutdown, name="accumulator-server-shutdown", daemon=True).start()


def process_started() -> float | None:
    """When this process started (epoch seconds), from Linux's /proc; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def run_job(app_name: str, job, master: str | None = None, context_only: bool = False, ahead=None) -> int:
    """Script entry of a Spark job: logging, config, a session (a bare SparkContext with ``context_only``),
    `job(spark, cfg)`, its outcome as a JSON line with the job's ``timeline`` (epoch seconds: the driver JVM and
    this process started, imports done, Spark ready, job done), which says where a spark-submit's start-up goes.

    ``ahead(cfg)``: work that needs no Spark (reading the job's input), started on a thread before the session so
    that the two overlap; the job is then called as `job(spark, cfg, future)` with its `Future`. Once Spark is up,
    its Python workers start on another thread (`start_warming_workers`) while the job's driver reads its input:
    the job's first Spark pass reuses them (a 10,000-device round −1 s), and the run that writes the driver's class
    archive (`class_archive_option`) has run a Python job, whose classes later first jobs then load from it."""
    import json
    import logging
    import time
    from concurrent.futures import ThreadPoolExecutor

    from config import ConfigError, load_config
    from spark_jobs.partitions import start_warming_workers
    from spark_jobs.worker_daemon import use_installed_pyspark
    from storage.errors import StorageError

    use_installed_pyspark()  # before the first import of pyspark below
    timeline = {"python_started": process_started(), "imported": time.time()}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)  # not a line per connection it closes
    log = logging.getLogger(app_name)
    try:
        cfg = load_config()
        pending = None
        if ahead is not None:
            pool = ThreadPoolExecutor(1, thread_name_prefix=f"{app_name}-ahead")
            pending = pool.submit(ahead, cfg)
            pool.shutdown(wait=False)  # the thread finishes the work; nothing else is submitted
        spark = (new_spark_context if context_only else spark_session)(cfg, app_name, master)
        sc = context_of(spark)
        warming = start_warming_workers(sc)
        timeline |= {"context_ready": time.time(), "jvm_started":
                     sc._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getStartTime() / 1000}
        try:
            outcome = job(spark, cfg) if pending is None else job(spark, cfg, pending)
        finally:
            timeline["job_done"] = time.time()
            warming.join()  # no job outlives the context
            stop_without_waiting(spark)
    except (ConfigError, StorageError) as exc:  # a setting wrong, the database down: its message, no traceback
        log.error("%s", exc)
        return 1
    log.info(outcome.message)
    print(json.dumps({"outcome": outcome.to_dict(), "timeline": timeline}))
    return 0
