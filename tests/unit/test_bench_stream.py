"""bench/stream.py's helpers that need no job: the backlog's Kafka timestamps and the rate over scores."""
import importlib.util
import sys

import pytest

from config import PROJECT_ROOT
from fakes import Producer
from telemetry.producer import produce
from telemetry.schema import Reading

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # bench/stream.py imports bench_output from beside it, as a script
SPEC = importlib.util.spec_from_file_location("bench_stream", PROJECT_ROOT / "bench" / "stream.py")
bench_stream = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_stream)


def test_a_backlog_encoded_first_is_sent_as_produce_sends_it_with_its_queued_timestamp_on_every_message():
    readings = [Reading(f"d{i % 3}", i // 3, 1_000 * i, {"m": 1.0}) for i in range(48)]
    key = b"k" * 32
    direct, encoded, sent = Producer(), bench_stream.Encoder(), Producer()
    produce(readings, "telemetry", {}, key=key, batch=4, producer=direct)
    direct.flush()
    result = produce(readings, "telemetry", {}, key=key, batch=4, producer=encoded)
    assert result.failed == 0 and result.readings == 48 and len(encoded.messages) == 12
    assert bench_stream.send_queued(sent, encoded.messages, 1_234) == 0
    assert sent.sent == direct.sent  # the same keys and signed bytes, in the same order
    assert sent.timestamps == [1_234] * 12


def test_send_queued_counts_the_messages_the_broker_refused():
    messages = [("telemetry", b"x", f"d{i}") for i in range(5)]
    assert bench_stream.send_queued(Producer(failing={"d1", "d3"}), messages, 0) == 2


class WindowSampler:
    """Stands in for `CpuSampler`: records the window it was asked about."""

    def cores_within(self, start_ms, end_ms):
        self.window = (start_ms, end_ms)
        return {"job_cores": {"jvm": 1.0}}


def test_scoring_rate_counts_scores_over_the_first_to_last_scored_at():
    sampler = WindowSampler()
    rate = bench_stream.scoring_rate([{"scored_at": at} for at in (5_000, 6_000, 6_500, 7_000, 9_000)], sampler)
    assert rate["readings_per_s"] == pytest.approx(5 / 4.0)
    assert rate["scores"] == 5 and rate["span_s"] == pytest.approx(4.0)
    assert sampler.window == (5_000, 9_000) and rate["job_cores"] == {"jvm": 1.0}
    assert rate["readings_per_s_by_10s"] == []  # no whole 10 s


def test_scoring_rate_gives_the_rate_of_every_whole_ten_seconds():
    at = [0] * 20 + [9_999] * 10 + [10_000] * 10 + [25_000, 29_999] * 10 + [31_000]  # 30, 10, 20 scores, then 1
    rate = bench_stream.scoring_rate([{"scored_at": t} for t in at], WindowSampler())
    assert rate["readings_per_s_by_10s"] == [3, 1, 2] and rate["readings_per_s"] == pytest.approx(61 / 31)


def test_micro_batches_tell_how_the_readings_were_batched():
    batched = bench_stream.micro_batches([128, 16, 16, 128, 32], full=128)
    assert batched == {"micro_batches": 5, "readings_per_micro_batch": 64.0, "share_in_full": 0.8}
    assert bench_stream.micro_batches([], full=128)["micro_batches"] == 0


def test_rate_after_counts_only_the_scores_made_from_then_on():
    sampler = WindowSampler()
    scores = [{"scored_at": at} for at in (5_000, 6_000, 6_500, 7_000, 9_000)]
    rate = bench_stream.rate_after(scores, 6_500, sampler)
    assert rate["scores"] == 3 and rate["readings_per_s"] == pytest.approx(3 / 2.5)
    assert sampler.window == (6_500, 9_000)
    assert bench_stream.rate_after(scores, 8_000, sampler) == {}  # one score: no span to divide by


def test_a_fleet_is_made_of_enough_copies_of_the_servers_each_under_its_own_id(monkeypatch):
    servers = [Reading(f"s{d}", seq, 1_000 * seq, {"m": float(seq)}) for d in range(3) for seq in range(4)]
    monkeypatch.setattr(bench_stream, "asd_readings", lambda cfg, per_device: servers)
    fleet = bench_stream.fleet_readings(None, 10, 4)
    devices = {r.device_id for r in fleet}
    assert len(devices) == 12  # 4 copies of 3 servers: at least the 10 asked for
    assert len(fleet) == 48 and [r.seq for r in fleet if r.device_id == "s1-f3"] == [0, 1, 2, 3]


def test_device_copies_rename_every_copy_but_the_kept_first():
    readings = [Reading("a", 0, 0, {"m": 1.0}), Reading("b", 0, 0, {"m": 2.0})]
    ids = [r.device_id for r in bench_stream.device_copies(readings, 3, "x", keep_first=True)]
    assert ids == ["a", "b", "a-x1", "b-x1", "a-x2", "b-x2"]
    assert [r.device_id for r in bench_stream.device_copies(readings, 1, "f")] == ["a-f0", "b-f0"]


def test_a_warm_row_reports_its_median_backlog_and_lists_every_backlog_in_order():
    runs = [{"readings_per_s": rate, "scores": i, "after_queued": {"readings_per_s": rate + 1000}}
            for i, rate in enumerate((40_000.4, 30_000.0, 35_000.0, 28_000.0, 36_000.0))]
    median = bench_stream.median_backlog(runs)
    assert median["readings_per_s"] == 35_000.0 and median["scores"] == 2  # the backlog itself, not a blend
    assert [t["readings_per_s"] for t in median["timed"]] == [40_000, 30_000, 35_000, 28_000, 36_000]
    assert median["timed"][0]["after_queued"] == 41_000
    assert bench_stream.median_backlog(runs[:1])["readings_per_s"] == 40_000.4
