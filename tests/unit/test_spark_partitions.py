"""spark_jobs.partitions without Spark: what the driver reads of a round's blocks on this machine."""
import json

import numpy as np

from models.aggregation import FedTrimmedAvg
from models.partitioned import Cohort, LocalPartitions, VectorBlock, aggregate, block_summary
from spark_jobs.partitions import LocalBlocks


def test_strategies_that_need_every_vector_read_the_blocks_here_not_through_spark(tmp_path):
    """Trimmed mean, clustering and DP take every vector to the driver: 10,000 devices' 372 MB through Spark's
    collect exhausted its default 1 GB driver. On a local master the driver maps the blocks' files itself (a
    `LocalBlocks` without a SparkContext here: any Spark job would fail), with the result of blocks held in memory."""
    rng = np.random.default_rng(0)
    blocks = [VectorBlock(i, [f"d{i}{j}" for j in range(6)], np.full(6, 10 + i), 3 + 0.1 * rng.normal(size=(6, 4)))
              for i in range(3)]
    for block in blocks:
        np.save(tmp_path / f"vectors-{block.index}.npy", block.vectors, allow_pickle=False)
        (tmp_path / f"rows-{block.index}.json").write_text(json.dumps({"device_ids": block.device_ids,
                                                                        "n_samples": block.n_samples.tolist()}))
    local = LocalBlocks(sc=None)
    local.directory, local.parts = tmp_path, len(blocks)
    summaries = [block_summary(b) for b in blocks]
    got = aggregate(FedTrimmedAvg(trim_fraction=0.2), Cohort(local, summaries))
    want = aggregate(FedTrimmedAvg(trim_fraction=0.2), Cohort(LocalPartitions(blocks), summaries))
    assert got.participants == want.participants and len(got.participants) == 18
    np.testing.assert_array_equal(got.weights[0], want.weights[0])


def test_a_round_has_at_most_one_partition_per_core_and_per_group_of_devices():
    """More partitions than cores only queue (and, when the partitions read the topic, each reads it again)."""
    from config import load_config
    from spark_jobs.partitions import partition_count
    from spark_jobs.topic_window import TopicWindow

    cfg = load_config(env={"FLEAD_AGGREGATION_SPARK_PARTITIONS": "4"})
    window = TopicWindow("snapshots", ((0, 0, 10),))
    groups = [[{"device_id": f"d{i}"}] for i in range(3)]
    assert [partition_count(cfg, window, cores) for cores in (1, 2, 8)] == [1, 2, 4]
    assert [partition_count(cfg, groups, cores) for cores in (1, 2, 8)] == [1, 2, 3]
    assert partition_count(cfg, window) == 4 and partition_count(cfg, []) == 1
