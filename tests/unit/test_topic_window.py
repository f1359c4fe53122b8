"""A round's window on the snapshots topic (`spark_jobs.topic_window`): offsets, and which partition checks what."""
from __future__ import annotations

import json

from hypothesis import given, strategies as st

from spark_jobs.topic_window import TopicWindow, end_offsets, own_snapshots, owner, split_snapshots, window_ranges

TOPIC = "flead.model-snapshots"


def message(device_id, version=1, **fields) -> bytes:
    return json.dumps({"device_id": device_id, "version": version, **fields}).encode()


def test_the_first_round_reads_the_whole_topic_while_nothing_was_deleted():
    assert window_ranges(TOPIC, {0: (0, 7), 1: (0, 0)}, None, first_round=True) == TopicWindow(
        TOPIC, ((0, 0, 7), (1, 0, 0)))
    assert window_ranges(TOPIC, {0: (3, 7)}, None, first_round=True) is None   # retention deleted the first 3


def test_a_round_starts_where_the_previous_one_ended_and_ends_at_the_watermarks_it_took():
    previous = end_offsets(TOPIC, {0: (0, 40), 1: (0, 12)})
    assert previous == {"topic": TOPIC, "offsets": [{"partition": 0, "offset": 40}, {"partition": 1, "offset": 12}]}
    window = window_ranges(TOPIC, {0: (10, 55), 1: (12, 12), 2: (0, 4)}, previous, first_round=False)
    assert window.ranges == ((0, 40, 55), (1, 12, 12), (2, 0, 4))   # partition 2 is new: from its start
    assert window.n_messages == 19


def test_the_topic_is_not_read_when_it_cannot_give_the_whole_window():
    previous = end_offsets(TOPIC, {0: (0, 40)})
    assert window_ranges(TOPIC, {0: (0, 50)}, None, first_round=False) is None          # previous round read MongoDB
    assert window_ranges("other", {0: (0, 50)}, previous, first_round=False) is None    # offsets of another topic
    assert window_ranges(TOPIC, {0: (41, 50)}, previous, first_round=False) is None     # deleted before being read
    assert window_ranges(TOPIC, {0: (0, 3)}, previous, first_round=False) is None       # the topic was made anew
    assert window_ranges(TOPIC, {0: (0, 40), 1: (2, 5)}, previous, first_round=False) is None  # new, truncated


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60), st.integers(1, 6))
def test_every_snapshot_is_checked_by_exactly_one_partition(devices, parts):
    values = [message(d, v) for v, d in enumerate(devices)]
    per_part = [own_snapshots(values, i, parts)[0] for i in range(parts)]
    got = sorted((d["device_id"], d["version"]) for docs in per_part for d in docs)
    assert got == sorted((d, v) for v, d in enumerate(devices))
    for i, docs in enumerate(per_part):
        assert all(owner(d["device_id"], parts) == i for d in docs)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 3)), max_size=40),
       st.integers(1, 5))
def test_the_driver_s_split_gives_each_partition_what_it_would_read_itself(messages, parts):
    values = [message(d, v) for d, v in messages] + [b"not json"]
    split, unreadable = split_snapshots(values, parts)
    assert split == [own_snapshots(values, i, parts)[0] for i in range(parts)]
    assert unreadable == 1


def test_a_device_s_snapshots_meet_in_one_partition_and_devices_spread_over_all():
    parts = 4
    counts = [0] * parts
    for i in range(2000):
        counts[owner(f"dev-{i:05d}", parts)] += 1
    assert min(counts) > 400   # CRC-32 spreads them evenly
    values = [message("dev-7", 1), message("dev-8", 1), message("dev-7", 2)]
    mine = own_snapshots(values, owner("dev-7", parts), parts)[0]
    assert [(d["device_id"], d["version"]) for d in mine if d["device_id"] == "dev-7"] == [("dev-7", 1), ("dev-7", 2)]


def test_a_redelivered_snapshot_is_kept_once_and_unreadable_messages_are_counted_once():
    values = [message("a", 1, loss=0.1), message("a", 1, loss=0.1), message("a", 2), b"not json", b"[1, 2]",
              message(None), json.dumps({"device_id": 7}).encode(), message("b", [1])]
    docs, unreadable = own_snapshots(values, 0, 1)
    assert [(d["device_id"], d["version"]) for d in docs] == [("a", 1), ("a", 2), ("b", [1])]
    assert unreadable == 4
    assert own_snapshots(values, 1, 2)[1] == 0   # only partition 0 counts them


def test_copies_of_one_version_that_differ_all_reach_the_checks():
    """A forged copy written ahead of a device's genuine snapshot must not hide it: the signature checks (after
    this step) decide which copy counts (tests/unit/test_aggregate_round.py)."""
    values = [message("a", 1, signature="forged"), message("a", 1, signature="genuine")]
    docs, _ = own_snapshots(values, 0, 1)
    assert [d["signature"] for d in docs] == ["forged", "genuine"]
