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
from datetime import datetime

from config import Config, load_config

log = logging.getLogger("flead.scheduler")


def aggregate_then_evaluate(spark, cfg: Config) -> None:
    """One scheduled run: a round, and an evaluation of the model it produced."""
    from spark_jobs.aggregate_job import run_round
    from spark_jobs.evaluate_job import run_evaluation

    outcome = run_round(spark, cfg)
    log.info("aggregation %s: %s", outcome.status, outcome.message)
    if outcome.status == "aggregated":
        evaluation = run_evaluation(spark, cfg)
        log.info("evaluation %s: %s", evaluation.status, evaluation.message)


def main() -> int:
    from apscheduler.schedulers.blocking import BlockingScheduler

    from spark_jobs.session import spark_session

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)  # one line per run is ours
    cfg = load_config()
    spark = spark_session(cfg, "flead-scheduler")
    scheduler = BlockingScheduler()
    scheduler.add_job(aggregate_then_evaluate, "interval", minutes=cfg.aggregation.schedule_minutes,
                      args=[spark, cfg], id="aggregate-evaluate", max_instances=1, coalesce=True,
                      next_run_time=datetime.now())
    signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown(wait=False))
    log.info("every %s minute(s): aggregation (%s) then evaluation, Spark master %s",
             cfg.aggregation.schedule_minutes, cfg.aggregation.strategy, spark.sparkContext.master)
    try:
        scheduler.start()
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
