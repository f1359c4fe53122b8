"""Consumer lag from Kafka's admin API: per consumer group and partition, end offset minus committed offset.

Only groups that have committed offsets on FLEAD's topics (`kafka.topics`) are reported, so other applications on
a shared cluster add no series. The stream job's groups commit when a checkpoint completes
(`stream.checkpoint_interval_ms`), the sink and the router after each stored batch.
"""
from __future__ import annotations

from typing import NamedTuple

from config import Config

ADMIN_TIMEOUT_S = 5.0


class PartitionLag(NamedTuple):
    group: str
    topic: str
    partition: int
    committed: int
    end: int

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed)


def consumer_lags(cfg: Config, timeout_s: float = ADMIN_TIMEOUT_S) -> list[PartitionLag]:
    """Lag of every consumer group with committed offsets on a configured topic, per partition."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    topics = set(cfg.kafka.topics.to_dict().values())
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap, "log_level": 0})
    groups = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    committed: dict[tuple[str, str, int], int] = {}
    for listing in sorted(groups.valid, key=lambda g: g.group_id):
        request = [ConsumerGroupTopicPartitions(listing.group_id)]  # the API takes one group per request
        future = admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[listing.group_id]
        for tp in future.result(timeout=timeout_s).topic_partitions or []:
            if tp.topic in topics and tp.offset >= 0:
                committed[(listing.group_id, tp.topic, tp.partition)] = tp.offset
    if not committed:
        return []
    wanted = {TopicPartition(topic, partition): OffsetSpec.latest() for _, topic, partition in committed}
    ends = {(tp.topic, tp.partition): future.result(timeout=timeout_s).offset
            for tp, future in admin.list_offsets(wanted, request_timeout=timeout_s).items()}
    return [PartitionLag(group, topic, partition, offset, ends[(topic, partition)])
            for (group, topic, partition), offset in sorted(committed.items())]


def total_lag_by_group(lags: list[PartitionLag]) -> dict[str, int]:
    """Messages each group is behind, summed over its partitions.

    >>> total_lag_by_group([PartitionLag("g", "t", 0, 5, 9), PartitionLag("g", "t", 1, 7, 7)])
    {'g': 4}
    """
    out: dict[str, int] = {}
    for item in lags:
        out[item.group] = out.get(item.group, 0) + item.lag
    return out
