"""The embedded scheduler: an aggregation round, then (if it produced a model) an evaluation, every
`aggregation.schedule_minutes`, on one SparkSession kept warm in this process.

    python -m spark_jobs.scheduler      # or `flead scheduler start` (background, stopped by `flead down`)

In-process rather than spark-submit per run: a cold spark-submit spends 26-34 s starting up, a warm round on
1,000 devices takes a few seconds (bench/aggregate.py). APScheduler runs at most one round at a time
(``max_instances=1``) and folds missed runs into one (``coalesce=True``). For cron, see spark_jobs/crontab.example.
"""
from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime

from config import Config, load_config

log = logging.getLogger("flead.scheduler")


def aggregate_then_evaluate(spark, cfg: Config, stopping: threading.Event | None = None) -> None:
    """One scheduled run: a round, and an evaluation of the model it produced. A run that fails because the
    scheduler is being stopped (`stopping` set: its Spark JVM gets the signal too) logs one line, not a traceback."""
    from spark_jobs.aggregate_job import run_round
    from spark_jobs.evaluate_job import run_evaluation

    try:
        outcome = run_round(spark, cfg)
        log.info("aggregation %s: %s", outcome.status, outcome.message)
        if outcome.status == "aggregated":
            evaluation = run_evaluation(spark, cfg)
            log.info("evaluation %s: %s", evaluation.status, evaluation.message)
    except Exception:
        if stopping is None or not stopping.is_set():
            raise
        log.info("stopped during a run: what it had not written yet, the next run does again")


def main() -> int:
    from apscheduler.schedulers.blocking import BlockingScheduler

    from spark_jobs.session import spark_session

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)  # one line per run is ours
    cfg = load_config()
    spark = spark_session(cfg, "flead-scheduler")
    scheduler = BlockingScheduler()
    stopping = threading.Event()
    scheduler.add_job(aggregate_then_evaluate, "interval", minutes=cfg.aggregation.schedule_minutes,
                      args=[spark, cfg, stopping], id="aggregate-evaluate", max_instances=1, coalesce=True,
                      next_run_time=datetime.now())

    def stop(*_) -> None:
        stopping.set()
        logging.getLogger("py4j").setLevel(logging.CRITICAL)  # a running job's connection errors, the JVM gone
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    log.info("every %s minute(s): aggregation (%s) then evaluation, Spark master %s",
             cfg.aggregation.schedule_minutes, cfg.aggregation.strategy, spark.sparkContext.master)
    try:
        scheduler.start()
    finally:
        if not stopping.is_set():  # stopped by a signal, the Spark JVM got it too (it reaches the process group)
            spark.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
