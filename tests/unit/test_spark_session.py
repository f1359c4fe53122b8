"""spark_jobs.session without Spark: how a job script started by spark-submit (or cron) ends on a bad setting."""
import logging

from spark_jobs.session import run_job


def test_a_job_with_a_bad_setting_says_which_in_one_line_and_exits_1(monkeypatch, caplog):
    monkeypatch.setenv("FLEAD_AGGREGATION_SPARK_PARTITIONS", "many")
    started = []
    with caplog.at_level(logging.ERROR):
        assert run_job("flead-test", lambda spark, cfg: started.append(spark)) == 1
    assert not started
    assert [r.getMessage() for r in caplog.records if r.name == "flead-test"] == [
        "aggregation.spark_partitions: cannot read 'many' as int"]
