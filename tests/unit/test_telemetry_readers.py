"""Each reader against known rows of its reference file, plus the generic cases a user's own files hit."""
import gzip
import json
import math
from pathlib import Path

import pytest

from config import load_config
from telemetry.readers import (IntelLabReader, MultiEntityCsvReader, NabReader, NetLoadReader, NslKddReader,
                               ReaderError, open_reader, parse_timestamp)
from telemetry.synthetic import SAMPLES_DIR

DATA = load_config().data_dir
needs_data = pytest.mark.skipif(not (DATA / "asd").is_dir(), reason=f"reference data not found in {DATA}")


def ms(text):
    return parse_timestamp(text)


@pytest.mark.parametrize("text, expected", [
    ("2024-01-31T00:05:00Z", 1706659500000),
    ("2024-01-31 00:05:00", 1706659500000),
    ("2024-01-31T01:05:00+01:00", 1706659500000),
    ("2014-04-10 07:15:00.000000", 1397114100000),
    ("1706659500", 1706659500000),
    ("1706659500000", 1706659500000),
    ("1706659500.25", 1706659500250),
])
def test_parse_timestamp(text, expected):
    assert parse_timestamp(text) == expected


@needs_data
def test_asd_test_file_first_and_last_rows_of_omi_1():
    reader = open_reader("asd", DATA / "asd/test.csv.gz")
    omi1 = [r for r in reader if r.device_id == "omi-1"]
    first, last = omi1[0], omi1[-1]
    assert (first.seq, first.ts, first.label) == (0, ms("2024-01-31T00:00:00Z"), 0)
    assert list(first.metrics.values())[:7] == [0.56, 0.5, 0.5, 0.52, 0.5, 0.3, 0.58]
    assert first.metrics["m18"] == 0.44
    assert (last.seq, last.ts, last.label) == (4319, ms("2024-02-14T23:55:00Z"), 0)
    assert last.metrics["m00"] == 0.49 and last.metrics["m18"] == 0.45
    assert reader.metric_names == [f"m{i:02d}" for i in range(19)]
    assert reader.stats.rows == reader.stats.readings == 12 * 4320 and reader.stats.skipped == 0


def write(path: Path, text: str, gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_multi_entity_csv_any_devices_metrics_and_ranges(tmp_path, gz):
    text = ("device_id,timestamp,cpu,bytes_out\n"
            "a,2024-01-01T00:00:00Z,-3.5,1e9\n"
            "b,2024-01-01T00:00:00Z,,7\n"
            "a,2024-01-01T00:01:00Z,12,nan\n")
    reader = MultiEntityCsvReader(write(tmp_path / "m.csv", text, gz))
    rs = list(reader)
    assert reader.metric_names == ["cpu", "bytes_out"]
    assert [(r.device_id, r.seq) for r in rs] == [("a", 0), ("b", 0), ("a", 1)]
    assert rs[0].metrics == {"cpu": -3.5, "bytes_out": 1e9} and rs[0].label is None
    assert math.isnan(rs[1].metrics["cpu"]) and math.isnan(rs[2].metrics["bytes_out"])
    assert rs[2].ts - rs[0].ts == 60_000


def test_multi_entity_csv_bad_rows_raise_with_file_and_line_or_are_skipped(tmp_path):
    path = write(tmp_path / "m.csv", "device_id,timestamp,x,label\n"
                                     "a,2024-01-01T00:00:00Z,1,0\n"
                                     "a,yesterday,2,0\n"
                                     "a,2024-01-01T00:02:00Z,3\n"
                                     "a,2024-01-01T00:03:00Z,abc,0\n"
                                     "a,2024-01-01T00:04:00Z,4,7\n"
                                     "a,2024-01-01T00:05:00Z,5,1\n")
    with pytest.raises(ReaderError, match=r"m\.csv:3: .*yesterday"):
        list(MultiEntityCsvReader(path))
    reader = MultiEntityCsvReader(path, skip_bad=True)
    rs = list(reader)
    assert [(r.seq, r.metrics["x"], r.label) for r in rs] == [(0, 1.0, 0), (1, 5.0, 1)]
    assert (reader.stats.rows, reader.stats.readings, reader.stats.skipped) == (6, 2, 4)
    assert reader.stats.errors[1] == f"{path}:4: expected 4 columns, got 3"
    list(reader)  # a second pass counts afresh
    assert reader.stats.skipped == 4


def test_multi_entity_csv_wrong_header_is_an_error(tmp_path):
    with pytest.raises(ReaderError, match=r"h\.csv:1: header must be device_id,timestamp"):
        list(MultiEntityCsvReader(write(tmp_path / "h.csv", "time,device,x\n")))


@needs_data
def test_nab_file_labelled_window():
    reader = NabReader(DATA / "nab/realKnownCause")
    name = "machine_temperature_system_failure"
    windows = json.loads((DATA / "nab/labels/combined_windows.json").read_text())[f"realKnownCause/{name}.csv"]
    rs = [r for r in reader if r.device_id == name]
    assert rs[0].ts == ms("2013-12-02 21:15:00") and rs[0].metrics == {"value": 73.96732207}
    assert [r.seq for r in rs] == list(range(len(rs)))
    inside = {r.seq for r in rs if any(ms(a) <= r.ts <= ms(b) for a, b in windows)}
    assert inside and {r.seq for r in rs if r.label == 1} == inside
    first_in = min(inside)
    assert rs[first_in - 1].label == 0 and rs[first_in].ts == ms(windows[0][0])


@needs_data
def test_nab_device_ids_are_paths_below_the_given_folder_and_unlisted_files_have_no_label(tmp_path):
    reader = NabReader(DATA / "nab")
    assert "realKnownCause/nyc_taxi" in {reader.device_id(f) for f in reader.files}
    single = write(tmp_path / "mine.csv", "timestamp,value\n2024-01-01 00:00:00,1.5\n")
    [r] = list(NabReader(single))
    assert (r.device_id, r.metrics, r.label) == ("mine", {"value": 1.5}, None)


@needs_data
def test_nsl_kdd_rows_features_labels_and_time():
    path = DATA / "nsl-kdd/KDDTest+.txt"
    rs = list(NslKddReader(path, clients=4, seed=1))
    assert len(rs) == 22544
    assert rs[0].label == 1 and rs[0].metrics["count"] == 229 and len(rs[0].metrics) == 38  # neptune
    assert rs[2].label == 0 and rs[2].metrics["duration"] == 2 and rs[2].metrics["src_bytes"] == 12983  # normal
    assert rs[2].ts - rs[0].ts == 2000
    assert {r.device_id for r in rs} == {"client-0", "client-1", "client-2", "client-3"}
    assert [r.device_id for r in NslKddReader(path, clients=4, seed=1)][:50] == [r.device_id for r in rs[:50]]
    onehot = next(iter(NslKddReader(path, features="onehot")))
    assert len(onehot.metrics) == 38 + 3 + 70 + 11
    assert {k for k, v in onehot.metrics.items() if "=" in k and v == 1.0} == {
        "protocol_type=tcp", "service=private", "flag=REJ"}


@needs_data
def test_nsl_kdd_non_iid_assigns_each_service_to_one_client_in_every_file(tmp_path):
    by_service = {}
    for name in ["KDDTrain+_20Percent.txt", "KDDTest+.txt"]:
        path = DATA / "nsl-kdd" / name
        services = [line.split(",")[2] for line in path.read_text().splitlines()]
        for service, r in zip(services, NslKddReader(path, clients=5, non_iid=True)):
            by_service.setdefault(service, set()).add(r.device_id)
    assert all(len(clients) == 1 for clients in by_service.values())


def test_intel_lab_sample_rows_and_bad_lines(tmp_path):
    reader = IntelLabReader(SAMPLES_DIR / "synthetic_intel_lab.txt")
    rs = list(reader)
    assert rs[0].device_id == "mote-1" and rs[0].seq == 0
    assert rs[0].ts == ms("2004-03-01T00:00:07.339563Z") and rs[0].metrics == {
        "temperature": 18.4423, "humidity": 41.871, "light": 5.0, "voltage": 2.70111}
    assert {r.device_id for r in rs} == {"mote-1", "mote-2", "mote-3", "mote-4"}
    assert max(r.metrics["temperature"] for r in rs if r.device_id == "mote-2") == pytest.approx(122.153)
    path = write(tmp_path / "lab.txt", "2004-02-28 00:59:16.02785 3 1 19.9884 37.0933 45.08 2.69964\n"
                                       "2004-02-28 01:03:16.33393 11 1 19.3024\n")
    with pytest.raises(ReaderError, match=r"lab\.txt:2: expected 8 fields, got 5"):
        list(IntelLabReader(path))
    assert len(list(IntelLabReader(path, skip_bad=True))) == 1


def test_netload_sample_rows_and_optional_label(tmp_path):
    rs = list(NetLoadReader(SAMPLES_DIR / "synthetic_netload.csv"))
    assert len(rs) == 6 * 14 * 24
    assert rs[0].device_id == "core-rtr-1/xe-0/0/0" and rs[0].ts == ms("2024-03-01 00:00:00")
    assert rs[0].metrics == {"max_metric_value": 14.13, "mean_metric_value": 11.29}
    outage = [r for r in rs if r.device_id == "edge-sw-3/ge-1/0/2" and r.metrics["mean_metric_value"] == 0]
    assert len(outage) == 3
    path = write(tmp_path / "n.csv", "hostname,ifname,timeslot,mean_metric_value,max_metric_value,label\n"
                                     "h,e0,2024-01-01 00:00:00,1,2,1\n")
    [r] = list(NetLoadReader(path))
    assert (r.device_id, r.metrics, r.label) == ("h/e0", {"max_metric_value": 2.0, "mean_metric_value": 1.0}, 1)
    with pytest.raises(ReaderError, match="header lacks ifname"):
        list(NetLoadReader(write(tmp_path / "bad.csv", "timeslot,hostname,max_metric_value,mean_metric_value\n")))


def test_open_reader_rejects_unknown_formats():
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        open_reader("xml", "x")
