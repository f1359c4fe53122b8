"""The SparkSession of FLEAD's batch jobs, and the environment its Python workers need."""
from __future__ import annotations

import os
import sys

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


def spark_session(cfg: Config, app_name: str, master: str | None = None):
    """A SparkSession for FLEAD's jobs (UI off, few shuffle partitions).

    The master is, in order: `master`, the one spark-submit was given (``--master``), `aggregation.spark_master`.
    """
    os.environ.update(worker_environment())  # read by the JVM and the workers it forks (local mode)
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.appName(app_name)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", str(cfg.aggregation.spark_partitions))
               .config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
               .config("spark.python.worker.reuse", "true"))
    spark = builder.master(master or submitted_master() or cfg.aggregation.spark_master).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def run_job(app_name: str, job, master: str | None = None) -> int:
    """Script entry of a Spark job: logging, config, a session, `job(spark, cfg)`, its outcome as a JSON line."""
    import json
    import logging

    from config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config()
    spark = spark_session(cfg, app_name, master)
    try:
        outcome = job(spark, cfg)
    finally:
        spark.stop()
    logging.getLogger(app_name).info(outcome.message)
    print(json.dumps({"outcome": outcome.to_dict()}))
    return 0
