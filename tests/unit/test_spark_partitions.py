"""spark_jobs.partitions without Spark: how many partitions a round takes."""
from config import load_config
from spark_jobs.partitions import partition_count
from spark_jobs.topic_window import TopicWindow


def test_a_round_has_at_most_one_partition_per_core_and_per_group_of_devices():
    """More partitions than cores only queue (and, when the partitions read the topic, each reads it again)."""
    cfg = load_config(env={"FLEAD_AGGREGATION_SPARK_PARTITIONS": "4"})
    window = TopicWindow("snapshots", ((0, 0, 10),))
    groups = [[{"device_id": f"d{i}"}] for i in range(3)]
    assert [partition_count(cfg, window, cores) for cores in (1, 2, 8)] == [1, 2, 4]
    assert [partition_count(cfg, groups, cores) for cores in (1, 2, 8)] == [1, 2, 3]
    assert partition_count(cfg, window) == 4 and partition_count(cfg, []) == 1
